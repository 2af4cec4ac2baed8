"""`GET /openapi.json`: a valid OpenAPI 3.1 document naming exactly the app's routes, schemas from the wire Structs."""

from __future__ import annotations

from pathlib import Path

import msgspec
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.openapi import OPERATIONS, build_document, openapi_path
from server.wire.chat import ChatCompletionRequest


def _app_operations(tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(Settings(data_dir=tmp_path))
    found = set()
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {route!r}"
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                found.add((method.lower(), openapi_path(route.path)))
    return found


def test_document_is_valid_openapi_3() -> None:
    document = build_document()
    assert document["openapi"].startswith("3.")
    validate(document)


def test_document_lists_every_route_of_the_app_and_nothing_else(tmp_path: Path) -> None:
    documented = {(method, path) for path, item in build_document()["paths"].items() for method in item}
    assert documented == _app_operations(tmp_path)
    assert len(documented) == len(OPERATIONS)


def test_request_schemas_come_from_the_wire_structs() -> None:
    document = build_document()
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and set(chat["properties"]) == set(ChatCompletionRequest.__struct_fields__)
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    for path, method in [
        ("/v1/completions", "post"),
        ("/v1/embeddings", "post"),
        ("/v1/responses", "post"),
        ("/v1/fine_tuning/jobs", "post"),
    ]:
        ref = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in schemas
    upload = document["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"]
    assert document["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["name"] == "model_id"
    error = schemas["ErrorObject"]
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_served_without_a_key(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path, api_keys=("sk-x",))))  # no lifespan: no models
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert msgspec.json.decode(response.content) == build_document()
    assert client.get("/v1/models").status_code == 401
