"""Request decoding and response encoding with msgspec, with OpenAI-shaped 400s for bad bodies.

Unknown fields are accepted (msgspec ignores them), explicit nulls decode to
the field's default where the Struct allows None, and a wrong type names the
offending field in `param` (``messages[0].content``).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from server.errors import InvalidRequestError, UnsupportedMediaTypeError

T = TypeVar("T")

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_encoder = msgspec.json.Encoder()


_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
# scanned left to right: an escaped backslash, a valid surrogate pair, or a lone surrogate (group "lone")
_SURROGATES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|(?P<lone>\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


def _param_from(message: str) -> tuple[str, str | None]:
    match = _PATH.search(message)
    missing = _MISSING.search(message)
    if not match:
        return message, missing.group("field") if missing else None
    path = match.group("path").lstrip(".")
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return message[: match.start()], path or None


def _lone_surrogate(body: bytes) -> tuple[str, int] | None:
    """The first `\\uD800`-style escape that is half of a UTF-16 pair without its other half, and its offset."""
    for match in _SURROGATES.finditer(body):
        if match.group("lone"):
            return match.group("lone").decode(), match.start()
    return None


def _unparsable(body: bytes, exc: Exception) -> InvalidRequestError:
    lone = _lone_surrogate(body)
    if lone is not None:  # msgspec calls this "Input data was truncated" when nothing follows the escape
        return InvalidRequestError(
            f"We could not parse the JSON body of your request: the escape '{lone[0]}' at byte {lone[1]} is half of "
            f"a UTF-16 surrogate pair without its other half, which is not a character. The OpenAI API expects "
            f"a JSON payload of valid Unicode text.",
            code="invalid_json",
        )
    return InvalidRequestError(
        f"We could not parse the JSON body of your request ({exc}). The OpenAI API expects a JSON payload.",
        code="invalid_json",
    )


def decode_json(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into `kind`, raising InvalidRequestError (400) naming the bad param."""
    if not body.strip():
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message, param = _param_from(str(exc))
        where = f" (at '{param}')" if param else ""
        raise InvalidRequestError(f"Invalid request: {message}{where}.", param=param) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # a string holding bytes that are not UTF-8
        raise _unparsable(body, exc) from exc
    except RecursionError as exc:  # msgspec's nesting limit (e.g. 10,000 nested lists)
        raise InvalidRequestError("The JSON body of your request is nested too deeply.", code="invalid_json") from exc


def _is_json(content_type: str) -> bool:
    """Anything but multipart is read as JSON: `curl -d '{...}'` sends its JSON labelled as a form."""
    media = content_type.split(";", 1)[0].strip().lower()
    return not media.startswith("multipart/")


async def read_json(request: Request, kind: type[T]) -> T:
    """The body as `kind`, whatever its Content-Type says (a wrong label is a common client slip, and
    the JSON itself is checked); only a multipart body, which cannot be JSON, is a 415."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"Unsupported Content-Type '{content_type}': send the JSON body with 'Content-Type: application/json'."
        )
    return decode_json(await request.body(), kind)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(obj), status_code=status, headers=headers, media_type="application/json")
