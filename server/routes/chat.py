"""`POST /v1/chat/completions`: decode, plan, then answer as JSON or as an SSE stream."""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.models.registry import ModelRegistry
from server.serving import chat
from server.serving.scope import RequestScope, conversation_id
from server.wire.chat import ChatCompletionRequest
from server.wire.codec import json_response, read_json

KEEPALIVE_SECONDS = 5


async def chat_completions(request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest)
    registry: ModelRegistry = request.app.state.registry
    served = registry.resolve(body.model, "chat")
    conversation = conversation_id(request, body.prompt_cache_key, body.user)
    # tokenizing and compiling a grammar can take a while: keep it off the event loop
    plan = await run_in_threadpool(chat.prepare, body, served, RequestScope.of(request), conversation)
    if body.stream:
        return EventSourceResponse(chat.stream(plan), ping=KEEPALIVE_SECONDS)
    return json_response(await chat.complete(plan))


routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
