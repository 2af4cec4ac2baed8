"""OpenAI-shaped errors: every failure a client can see leaves through here.

Body: ``{"error": {"message", "type", "param", "code"}}``. The status picks the
``openai`` SDK's exception class (400 BadRequest, 401 Authentication, 404
NotFound, 413, 429 RateLimit, 5xx InternalServer); ``x-should-retry: false``
stops the SDK from retrying errors a retry cannot fix.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, param: str | None = "model") -> None:
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param=param)


class MethodNotAllowedError(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaTypeError(APIError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(APIError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class GatewayTimeoutError(APIError):
    status = 504
    type = "server_error"
    code = "timeout"


class ServiceUnavailableError(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_response(exc: APIError, request_id: str | None = None) -> Response:
    headers = dict(exc.headers)
    if exc.status >= 500 and exc.status != 503 and "x-should-retry" not in headers:
        headers["x-should-retry"] = "false"
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        msgspec.json.encode(exc.body()), status_code=exc.status, headers=headers, media_type="application/json"
    )


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc, _request_id(request))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    err: APIError
    if exc.status_code == 404:
        err = NotFoundError(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
    elif exc.status_code == 405:
        err = MethodNotAllowedError(f"Method {request.method} is not allowed for {request.url.path}.")
        if exc.headers and "allow" in {k.lower() for k in exc.headers}:
            err.headers.update(exc.headers)
    else:
        err = APIError(str(exc.detail), status=exc.status_code)
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(err, _request_id(request))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: log it with the request id, answer a 500 the client can report."""
    request_id = _request_id(request)
    log.exception("unhandled error in request %s", request_id)
    err = APIError(f"The server had an error while processing your request (request id {request_id}).")
    return error_response(err, request_id)
