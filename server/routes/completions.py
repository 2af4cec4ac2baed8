"""`POST /v1/completions` (legacy text completions): JSON or SSE."""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.models.registry import ModelRegistry
from server.serving import completions
from server.serving.scope import RequestScope, conversation_id
from server.wire.codec import json_response, read_json
from server.wire.completions import CompletionRequest

KEEPALIVE_SECONDS = 5


async def create_completion(request: Request) -> Response:
    body = await read_json(request, CompletionRequest)
    registry: ModelRegistry = request.app.state.registry
    served = registry.resolve(body.model, "chat")
    conversation = conversation_id(request, body.prompt_cache_key, body.user)
    plan = await run_in_threadpool(completions.prepare, body, served, RequestScope.of(request), conversation)
    if body.stream:
        return EventSourceResponse(completions.stream(plan), ping=KEEPALIVE_SECONDS)
    return json_response(await completions.complete(plan))


routes = [Route("/v1/completions", create_completion, methods=["POST"])]
