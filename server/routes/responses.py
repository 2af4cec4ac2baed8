"""`/v1/responses`: create (JSON or SSE), retrieve, delete, and list a stored response's input items.

Stored responses live in the app's SQLite database (`server.persistence.responses`),
scoped to the API key that created them: another key gets a 404.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.errors import InvalidRequestError, NotFoundError
from server.persistence.responses import ResponseStore
from server.registry import ModelRegistry
from server.routes.admission import admit_generation, off_loop, within_limits
from server.routes.event_stream import EventStream
from server.serving import response_output, responses
from server.serving.scope import RequestScope, conversation_header_safe, conversation_id
from server.wire.codec import json_response, read_json
from server.wire.responses import ResponseDeleted, ResponseRequest

MAX_PAGE = 100


def _store(request: Request) -> ResponseStore:
    """The app's response store (made, and its tables migrated, by create_app)."""
    store: ResponseStore = request.app.state.response_store
    return store


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")


async def create_response(request: Request) -> Response:
    body = await read_json(request, ResponseRequest)
    registry: ModelRegistry = request.app.state.registry
    served = await registry.acquire(body.model, "chat", RequestScope.of(request).tenant)
    request.state.model = served.id
    store = _store(request)
    conversation = conversation_id(request, body.prompt_cache_key, body.user)
    plan = await off_loop(responses.prepare, body, served, RequestScope.of(request), conversation, store)
    plan.timer = admit_generation(request, served, [plan.request])
    if body.stream:
        answer: Response = EventStream(
            response_output.stream(plan, store), ping=request.app.state.settings.sse_keepalive
        )
    else:
        answer = json_response(await within_limits(request, response_output.complete(plan, store)))
    if plan.conversation and "x-conversation-id" not in request.headers and conversation_header_safe(plan.conversation):
        answer.headers["x-conversation-id"] = plan.conversation  # the chain's key: a proxy routes follow-ups on it
    return answer


async def retrieve_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    if request.query_params.get("stream") in ("true", "1"):
        raise InvalidRequestError(
            "Streaming a stored response needs background mode, which is not supported.", param="stream"
        )
    body = await run_in_threadpool(_store(request).body, RequestScope.of(request).tenant, response_id)
    if body is None:
        raise _not_found(response_id)
    return Response(body, media_type="application/json")


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    if not await run_in_threadpool(_store(request).delete, RequestScope.of(request).tenant, response_id):
        raise _not_found(response_id)
    return json_response(ResponseDeleted(id=response_id))


async def list_input_items(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"'order' must be 'asc' or 'desc', got '{order}'.", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"'limit' must be an integer from 1 to {MAX_PAGE}.", param="limit")
    try:
        page = await run_in_threadpool(
            _store(request).input_items,
            RequestScope.of(request).tenant,
            response_id,
            after=query.get("after"),
            limit=limit,
            order=order,
        )
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid 'after': {exc}.", param="after") from exc
    if page is None:
        raise _not_found(response_id)
    return json_response(page)


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
