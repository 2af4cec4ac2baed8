"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape.

Ids arrive percent-encoded (`org%2Fname`) and the server decodes them; the path
converter takes the rest of the path so ids with `/` and `:` (fine-tuned `ft:` ids) route correctly.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.registry import ModelRegistry, ServedModel
from server.serving.scope import RequestScope
from server.wire.codec import json_response
from server.wire.models import ModelCard, ModelList


def _card(served: ServedModel) -> ModelCard:
    return ModelCard(id=served.id, created=served.created, owned_by=served.owned_by)


async def list_models(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    listed = [m for m in registry.list(RequestScope.of(request).tenant) if m.listed]  # no checkpoints
    return json_response(ModelList(data=[_card(m) for m in listed]))


async def get_model(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    model_id = request.path_params["model_id"]  # the server already percent-decoded the path
    return json_response(_card(registry.get(model_id, RequestScope.of(request).tenant)))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
