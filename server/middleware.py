"""Pure-ASGI middleware: request ids, bearer-key auth, and the request body limit.

Each is a small class wrapping the next ASGI app (Starlette's pattern), so
they work for streaming responses too and add no per-chunk overhead.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationError, PayloadTooLargeError, error_response

log = logging.getLogger(__name__)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PATHS = frozenset({"/health", "/ready"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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


class AuthMiddleware:
    """When keys are configured, require `Authorization: Bearer <key>` on every non-public path."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in api_keys)

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization")
        if not header or not header.lower().startswith("bearer "):
            return False
        presented = header[7:].strip().encode()
        # compare against every key so timing does not reveal which prefix matched
        return any([hmac.compare_digest(presented, key) for key in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            provided = _header(scope, b"authorization")
            message = ("You didn't provide an API key. Provide it as `Authorization: Bearer YOUR_KEY`."
                       if not provided else "Incorrect API key provided.")
            request_id = scope.get("state", {}).get("request_id")
            await error_response(AuthenticationError(message), request_id)(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
