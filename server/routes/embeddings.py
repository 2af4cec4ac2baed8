"""`POST /v1/embeddings`: decode, tokenize off the event loop, embed through the model's micro-batcher."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.rate_limits import admit
from server.registry import ModelRegistry
from server.serving import embeddings
from server.serving.scope import RequestScope
from server.wire.codec import json_response, read_json
from server.wire.embeddings import EmbeddingRequest


async def create_embeddings(request: Request) -> Response:
    body = await read_json(request, EmbeddingRequest)
    registry: ModelRegistry = request.app.state.registry
    served = await registry.acquire(body.model, "embedding", RequestScope.of(request).tenant)
    request.state.model = served.id
    embeddings.check_request(body, served)
    items = embeddings.input_items(body.input)
    ids = await run_in_threadpool(embeddings.token_ids, items, served, bool(body.truncate))
    admit(request, sum(len(x) for x in ids))
    vectors = await served.running_batcher.embed(ids)
    return json_response(embeddings.respond(vectors, body, served, sum(len(x) for x in ids)))


routes = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
