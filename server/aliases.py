"""OpenAI's routes without the `/v1` prefix: `/chat/completions`, `/models`, `/responses/{id}`, `/files`, ...

llama.cpp's server and `mlx_lm.server` answer these, and clients configured
with a bare host (`base_url="http://host:8000"`) call them. There is one
routing table: a request whose path some `/v1/...` route matches once the
prefix is put in front is rewritten to that path before any other middleware
sees it, so auth, rate limits, the body limits (the larger one of `/v1/files`),
metrics route labels and trailing-slash handling are the `/v1` route's own.
A path one of the app's own unprefixed routes matches (`/health`) is never
rewritten; any other path is left as it is (and 404s, naming the path sent).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/v1"


class VersionPrefixMiddleware:
    """Serve `/chat/completions` as `/v1/chat/completions`, for every route under the prefix."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], prefix: str = PREFIX) -> None:
        self.app = app
        self.prefix = prefix
        prefixed = [str(getattr(r, "path", "")).startswith(prefix + "/") for r in routes]
        self.routes = tuple(r for r, under in zip(routes, prefixed) if under)
        self.own = tuple(r for r, under in zip(routes, prefixed) if not under)  # /health, /metrics, ...

    def aliased(self, scope: Scope) -> Scope | None:
        """The scope with the prefix put in front, when a prefixed route matches it (any method) and no route
        of the app's own matches the path as sent; else None."""
        path: str = scope.get("path", "")
        if not path.startswith("/") or path == self.prefix or path.startswith(self.prefix + "/"):
            return None
        if any(route.matches(scope)[0] != Match.NONE for route in self.own):
            return None
        raw = scope.get("raw_path")
        candidate = {
            **scope,
            "path": self.prefix + path,
            "raw_path": self.prefix.encode() + raw if isinstance(raw, bytes) else raw,
        }
        if any(route.matches(candidate)[0] != Match.NONE for route in self.routes):
            return candidate
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = self.aliased(scope) or scope
        await self.app(scope, receive, send)
