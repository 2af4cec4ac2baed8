"""Pure-ASGI middleware: request ids, conversation ids (X-Conversation-Id), access logs and metrics, API-key auth (and the metrics key), rate limits,
the body limit, and closing connections whose request body was left unread.

Each is a small class wrapping the next ASGI app (Starlette's pattern), so
they work for streaming responses too and add no per-chunk overhead.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import (
    AuthenticationError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitError,
    error_response,
)
from server.keys import ANONYMOUS, ApiKey, KeyRing
from server.metrics import Metrics
from server.rate_limits import RateLimits
from server.serving.scope import conversation_header_safe

log = logging.getLogger(__name__)
access_log = logging.getLogger("mlx_dropin.access")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CONVERSATION_HEADER = b"x-conversation-id"
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})
METRICS_PATH = "/metrics"
KEY_HEADERS = (b"api-key", b"x-api-key")  # Azure's and Anthropic's, read after `Authorization: Bearer`


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
    return chunked or (length is not None and length.strip() not in ("", "0"))


class TrailingSlashMiddleware:
    """Serve `/v1/models/` as `/v1/models`: trailing slashes are dropped in place, never redirected (a 307
    with an empty body is not an answer an OpenAI client can use, and re-sent POSTs lose their bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            trimmed = path.rstrip("/") or "/"
            raw = scope.get("raw_path")
            scope = {**scope, "path": trimmed, "raw_path": raw.rstrip(b"/") or b"/" if isinstance(raw, bytes) else raw}
        await self.app(scope, receive, send)


class UnreadBodyMiddleware:
    """Answer `connection: close` when a response starts before the request body was read to its end (an
    early 401, 404, 405, 413 or 415). hypercorn cannot reuse such a connection and would close it without
    a word, racing the client's next request on it ("Server disconnected without sending a response")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        read = False

        async def watched_receive() -> Message:
            nonlocal read
            message = await receive()
            read = read or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not read:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watched_receive, closing_send)


class RequestIdMiddleware:
    """Give every request an id (the client's x-request-id if sane) and echo it on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _CLIENT_REQUEST_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", raw_id))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ConversationIdMiddleware:
    """Check the client's X-Conversation-Id (the conversation key a proxy routes replicas on) and echo it on every
    response to that request, errors included; a malformed one is a 400 before any work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = _header(scope, CONVERSATION_HEADER) if scope["type"] == "http" else None
        if incoming is None:
            await self.app(scope, receive, send)
            return
        if not conversation_header_safe(incoming):
            refusal = InvalidRequestError(
                "X-Conversation-Id must be 1 to 256 visible ASCII characters (no spaces).",
                code="invalid_conversation_id",
            )
            await error_response(refusal, scope.get("state", {}).get("request_id"))(scope, receive, send)
            return
        raw = incoming.encode("ascii")

        async def send_with_conversation(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != CONVERSATION_HEADER]
                headers.append((CONVERSATION_HEADER, raw))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_conversation)


class AccessLogMiddleware:
    """Count and time every request (metrics by route template) and log it as one JSON line on
    `mlx_dropin.access`: request id, method, path, status, duration, the key's tenant, the model."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = tuple(routes)

    def _route(self, scope: Scope) -> str:
        """The matched route's template (bounded label values); "unmatched" for unknown URLs."""
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["started"] = started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaping here becomes Starlette's 500

        async def send_watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_watched)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            self.metrics.observe_request(self._route(scope), scope["method"], status, seconds)
            key: ApiKey | None = state.get("api_key")
            model: str | None = state.get("model")
            access_log.info(
                json.dumps(
                    {  # key ids as keyed hashes only (ApiKey.log_id, ApiKey.scrub)
                        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        "request_id": state.get("request_id"),
                        "method": scope["method"],
                        "path": key.scrub(scope["path"]) if key is not None else scope["path"],
                        "status": status,
                        "duration_ms": round(seconds * 1000, 1),
                        "tenant": key.log_tenant if key is not None else None,
                        "key": key.log_id if key is not None else None,
                        "model": key.scrub(model) if key is not None and model is not None else model,
                    }
                )
            )


def presented_key(scope: Scope) -> str | None:
    """The key a request presents: the first of `Authorization: Bearer`, `api-key` and `x-api-key` that carries
    one. Later headers are not read, so a request with several keys is judged by the first alone."""
    header = _header(scope, b"authorization")
    if header and header.lower().startswith("bearer ") and header[7:].strip():
        return header[7:].strip()
    for name in KEY_HEADERS:
        value = (_header(scope, name) or "").strip()
        if value:
            return value
    return None


class AuthMiddleware:
    """Name the caller's key in ``scope["state"]["api_key"]``; when keys are configured, require a known one.

    On an open server every caller is the one anonymous key (tenant "public"), so
    rate limits still have someone to count. `/metrics` takes no API key: with a
    metrics key it needs exactly that one, else it is open.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, metrics_key: str | None = None) -> None:
        self.app = app
        self.keys = keys
        self._metrics_digest = hashlib.sha256(metrics_key.encode()).digest() if metrics_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == METRICS_PATH and self._metrics_digest is not None:
            digest = hashlib.sha256((presented_key(scope) or "").encode()).digest()
            if not hmac.compare_digest(digest, self._metrics_digest):
                await self._refuse(
                    scope,
                    receive,
                    send,
                    "/metrics needs the metrics key (--metrics-key); send it as `Authorization: Bearer METRICS_KEY`.",
                )
                return
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys.enabled:
            state["api_key"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope)
        key = self.keys.lookup(presented or "")
        if key is None:
            await self._refuse(
                scope,
                receive,
                send,
                "Incorrect API key provided."
                if presented
                else "You didn't provide an API key. Provide it as `Authorization: Bearer YOUR_KEY` "
                "(or in an `api-key` or `x-api-key` header).",
            )
            return
        state["api_key"] = key
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        request_id = scope.get("state", {}).get("request_id")
        await error_response(AuthenticationError(message), request_id)(scope, receive, send)


class RateLimitMiddleware:
    """Take a request from the key's requests bucket (429 when empty), put the x-ratelimit-* headers on
    every response, and release the sequences a generation held once its response has been sent."""

    def __init__(self, app: ASGIApp, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {})
        key: ApiKey | None = state.get("api_key")
        if scope["type"] != "http" or key is None or not self.limits.limited(key):
            await self.app(scope, receive, send)
            return
        try:
            self.limits.take_request(key)
        except RateLimitError as exc:
            exc.headers.update(self.limits.headers(key))
            await error_response(exc, state.get("request_id"))(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                limits = self.limits.headers(key)
                names = {name.encode() for name, _ in limits}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers += [(name.encode(), value.encode()) for name, value in limits]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            self.limits.release(key, state.pop("held_sequences", 0))


class BodyLimitMiddleware:
    """Refuse bodies over the limit: by Content-Length up front, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = dict(uploads or {})  # path -> a larger limit for POSTs there (file uploads)

    @staticmethod
    def _too_large(limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"Request body is larger than the server's limit of {limit} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope.get("method") == "POST" and scope.get("path") in self.uploads:
            limit = self.uploads[scope["path"]] + 64 * 1024  # room for the multipart framing
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            request_id = scope.get("state", {}).get("request_id")
            await error_response(self._too_large(limit), request_id)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit)  # becomes a 413 through the app's error handler
            return message

        await self.app(scope, limited_receive, send)
