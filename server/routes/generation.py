"""`POST /v1/chat/completions` and `POST /v1/completions`: decode, plan off the event loop, answer.

Both endpoints share one shape: a request Struct, a service whose `prepare`
builds the engine request (tokenizing, compiling any grammar: kept off the
event loop), then `complete` for JSON or `stream` for SSE with keep-alive
comments while a long prompt prefills.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.registry import ModelRegistry
from server.routes.admission import admit_generation, off_loop, within_limits
from server.routes.event_stream import EventStream
from server.serving import chat, completions
from server.serving.scope import RequestScope, conversation_id
from server.wire.chat import ChatCompletionRequest
from server.wire.codec import json_response, read_json
from server.wire.completions import CompletionRequest


def generation_endpoint(
    body_type: type[ChatCompletionRequest] | type[CompletionRequest],
    prepare: Callable[..., Any],
    complete: Callable[[Any], Awaitable[Any]],
    stream: Callable[[Any], AsyncGenerator[bytes, None]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        body: ChatCompletionRequest | CompletionRequest = await read_json(request, body_type)
        registry: ModelRegistry = request.app.state.registry
        served = await registry.acquire(body.model, "chat", RequestScope.of(request).tenant)
        request.state.model = served.id
        conversation = conversation_id(request, body.prompt_cache_key, body.user)
        plan = await off_loop(prepare, body, served, RequestScope.of(request), conversation)
        plan.timer = admit_generation(request, served, plan.requests)
        if body.stream:
            return EventStream(stream(plan), ping=request.app.state.settings.sse_keepalive)
        return json_response(await within_limits(request, complete(plan)))

    return endpoint


routes = [
    Route(
        "/v1/chat/completions",
        generation_endpoint(ChatCompletionRequest, chat.prepare, chat.complete, chat.stream),
        methods=["POST"],
    ),
    Route(
        "/v1/completions",
        generation_endpoint(CompletionRequest, completions.prepare, completions.complete, completions.stream),
        methods=["POST"],
    ),
]
