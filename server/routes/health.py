"""`GET /health` (the process is alive) and `GET /ready` (every model is loaded, every engine process up)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.registry import ModelRegistry
from server.wire.codec import json_response


async def health(request: Request) -> Response:
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    down = [m.id for m in registry.list() if m.engine is not None and not m.engine.alive]
    failed = {m.id: m.engine.failure for m in registry.list() if m.engine is not None and m.engine.failure}
    if registry.ready and failed:  # a model split over ranks lost one: it cannot run until the ranks restart
        return json_response(
            {"status": "failed", "models": sorted(failed), "error": next(iter(failed.values()))}, status=503
        )
    if registry.ready and down:  # an engine process died and is restarting
        return json_response({"status": "restarting", "models": down}, status=503, headers={"retry-after": "5"})
    if registry.ready:
        return json_response({"status": "ready", "models": [m.id for m in registry.list()]})
    if registry.failure:
        return json_response({"status": "failed", "error": registry.failure}, status=503)
    return json_response(
        {"status": "loading", "models": [m.id for m in registry.list() if m.loaded]},
        status=503,
        headers={"retry-after": "2"},
    )


routes = [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
