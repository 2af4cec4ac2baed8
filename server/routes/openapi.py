"""`GET /openapi.json`: the OpenAPI description of every public endpoint (no key needed, as /health)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.openapi import build_document
from server.wire.codec import encode


async def openapi(request: Request) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = encode(build_document())
    return Response(state.openapi, media_type="application/json")


routes = [Route("/openapi.json", openapi, methods=["GET"])]
