"""The OpenAPI 3.1 description served at `GET /openapi.json`.

One table, `OPERATIONS`, names every public endpoint: its method and path, the
msgspec Struct its JSON body decodes into and the Struct it answers with.
Schemas come from those Structs (`msgspec.json.schema_components`, JSON
Schema 2020-12, which OpenAPI 3.1 uses as is), so the document cannot drift
from what the server decodes; only the multipart upload and the plain health
answers are written out here. `tests/test_openapi.py` checks that the table
and the app's routes name the same operations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from server import __version__
from server.persistence.files import PURPOSES
from server.wire.chat import ChatCompletion, ChatCompletionRequest
from server.wire.completions import Completion, CompletionRequest
from server.wire.embeddings import EmbeddingList, EmbeddingRequest
from server.wire.files import FileDeleted, FileList, FileObject
from server.wire.fine_tuning import CheckpointList, EventList, FineTuningJob, JobCreateRequest, JobList
from server.wire.models import ModelCard, ModelDeleted, ModelList
from server.wire.responses import ItemList, Response, ResponseDeleted, ResponseRequest


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every non-2xx answer (server.errors)."""

    error: ErrorObject


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    method: str  # lower case, as OpenAPI keys them
    path: str  # an OpenAPI template: /v1/files/{file_id}
    summary: str
    tag: str
    body: type | None = None  # the Struct a JSON body decodes into
    answer: type | None = None  # the Struct of a 200 JSON answer
    streams: bool = False  # `stream: true` answers text/event-stream
    query: tuple[Query, ...] = ()
    public: bool = False  # no API key needed


def _limit(default: int, most: int) -> Query:
    return Query("limit", {"type": "integer", "minimum": 1, "maximum": most, "default": default}, "page size")


AFTER = Query("after", {"type": "string"}, "the last id of the previous page")
ORDER = Query("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"})
CHAT, LEGACY, EMBED, RESP, MODELS, FILES, FT, OPS = (
    "chat",
    "completions",
    "embeddings",
    "responses",
    "models",
    "files",
    "fine-tuning",
    "operations",
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/v1/chat/completions",
        "Create a chat completion (JSON, or SSE with stream)",
        CHAT,
        ChatCompletionRequest,
        ChatCompletion,
        streams=True,
    ),
    Operation(
        "post",
        "/v1/completions",
        "Create a legacy text completion",
        LEGACY,
        CompletionRequest,
        Completion,
        streams=True,
    ),
    Operation("post", "/v1/embeddings", "Embed texts or token ids", EMBED, EmbeddingRequest, EmbeddingList),
    Operation(
        "post",
        "/v1/responses",
        "Create a response (JSON, or SSE events with stream)",
        RESP,
        ResponseRequest,
        Response,
        streams=True,
    ),
    Operation("get", "/v1/responses/{response_id}", "Retrieve a stored response", RESP, answer=Response),
    Operation("delete", "/v1/responses/{response_id}", "Delete a stored response", RESP, answer=ResponseDeleted),
    Operation(
        "get",
        "/v1/responses/{response_id}/input_items",
        "List a stored response's input items",
        RESP,
        answer=ItemList,
        query=(AFTER, _limit(20, 100), ORDER),
    ),
    Operation("get", "/v1/models", "List models", MODELS, answer=ModelList),
    Operation(
        "get", "/v1/models/{model_id}", "Retrieve a model (ids percent-encoded: org%2Fname)", MODELS, answer=ModelCard
    ),
    Operation("delete", "/v1/models/{model_id}", "Delete one of your fine-tuned models", MODELS, answer=ModelDeleted),
    Operation("post", "/v1/files", "Upload a file (multipart: file, purpose)", FILES, answer=FileObject),
    Operation(
        "get",
        "/v1/files",
        "List files",
        FILES,
        answer=FileList,
        query=(AFTER, _limit(10_000, 10_000), ORDER, Query("purpose", {"type": "string"})),
    ),
    Operation("get", "/v1/files/{file_id}", "Retrieve a file object", FILES, answer=FileObject),
    Operation("delete", "/v1/files/{file_id}", "Delete a file", FILES, answer=FileDeleted),
    Operation("get", "/v1/files/{file_id}/content", "Download a file's bytes", FILES),
    Operation("post", "/v1/fine_tuning/jobs", "Create a fine-tuning job", FT, JobCreateRequest, FineTuningJob),
    Operation(
        "get",
        "/v1/fine_tuning/jobs",
        "List fine-tuning jobs",
        FT,
        answer=JobList,
        query=(
            AFTER,
            _limit(20, 100),
            Query("metadata", {"type": "object", "additionalProperties": {"type": "string"}}, "metadata[KEY]=VALUE"),
        ),
    ),
    Operation("get", "/v1/fine_tuning/jobs/{job_id}", "Retrieve a fine-tuning job", FT, answer=FineTuningJob),
    Operation("post", "/v1/fine_tuning/jobs/{job_id}/cancel", "Cancel a fine-tuning job", FT, answer=FineTuningJob),
    Operation(
        "get",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "List a job's events, newest first",
        FT,
        answer=EventList,
        query=(AFTER, _limit(20, 1000)),
    ),
    Operation(
        "get",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "List a job's checkpoints",
        FT,
        answer=CheckpointList,
        query=(AFTER, _limit(10, 100)),
    ),
    Operation("get", "/health", "The process is alive", OPS, public=True),
    Operation("get", "/ready", "200 once every model is loaded, else 503", OPS, public=True),
    Operation("get", "/metrics", "Prometheus metrics (text exposition format)", OPS, public=True),
    Operation("get", "/openapi.json", "This document", OPS, public=True),
)

_PATH_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")
_STATUS_TEXT = {
    "400": "Invalid request",
    "401": "Missing or unknown API key",
    "404": "Not found",
    "413": "Body too large",
    "415": "Body is not JSON",
    "429": "Rate limited",
    "503": "At capacity or still loading",
}
_MULTIPART = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": list(PURPOSES)},
    },
}
_STATUS = {
    "type": "object",
    "properties": {"status": {"type": "string"}},
    "required": ["status"],
    "additionalProperties": True,
}


def openapi_path(route_path: str) -> str:
    """A Starlette route path as an OpenAPI template (`{model_id:path}` -> `{model_id}`)."""
    return _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", route_path)


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _answer(op: Operation) -> dict[str, Any]:
    if op.answer is not None:
        content: dict[str, Any] = {"application/json": {"schema": _ref(op.answer)}}
        if op.streams:
            content["text/event-stream"] = {
                "schema": {
                    "type": "string",
                    "description": "with stream: true; chat and completions end with `data: [DONE]`",
                }
            }
        return {"description": "OK", "content": content}
    if op.path.endswith("/content"):
        return {
            "description": "The file's bytes",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    if op.path == "/metrics":
        return {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    schema = {"type": "object"} if op.path == "/openapi.json" else _STATUS
    return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _operation(op: Operation) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    out: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{op.method}_{re.sub(r'[^A-Za-z0-9]+', '_', op.path).strip('_')}",
        "responses": {
            "200": _answer(op),
            **{code: {"description": text, **error} for code, text in _STATUS_TEXT.items()},
            "default": {"description": "Other errors, OpenAI-shaped", **error},
        },
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(op.path)
    ]
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "schema": q.schema,
            **({"description": q.description} if q.description else {}),
            **({"style": "deepObject", "explode": True} if q.schema.get("type") == "object" else {}),
        }
        for q in op.query
    ]
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(op.body)}}}
    elif op.method == "post" and op.path == "/v1/files":
        out["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _MULTIPART}}}
    if op.public:
        out["security"] = []
    return out


def build_document() -> dict[str, Any]:
    """The whole OpenAPI document (a plain dict, ready to encode)."""
    structs = [ErrorResponse, *{t for op in OPERATIONS for t in (op.body, op.answer) if t is not None}]
    _, components = msgspec.json.schema_components(
        sorted(structs, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-dropin",
            "version": __version__,
            "description": "An OpenAI-compatible server for MLX. Errors are always "
            '`{"error": {"message", "type", "param", "code"}}`. Every `/v1/...` path '
            "is also served without the `/v1` prefix (`/chat/completions`), as the same "
            "operation; only the `/v1` paths are listed.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
