"""The HTTP skeleton through the `openai` SDK: model listing, OpenAI-shaped errors, auth, request ids."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def open_server(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(Settings(max_body_mb=1), registry)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_server(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(replace(Settings(), api_keys=(KEY, "sk-other")), registry)) as base:
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    return error


def test_models_list_has_the_defaults(open_server: str) -> None:
    models = client(open_server).models.list()
    ids = {m.id for m in models.data}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= ids
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models.data)


def test_models_retrieve(open_server: str) -> None:
    model = client(open_server).models.retrieve("smollm2-135m-instruct")
    assert model.id == "smollm2-135m-instruct" and model.object == "model"


def test_unknown_model_is_404_model_not_found(open_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(open_server).models.retrieve("org/no-such-model")
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_unknown_route_is_openai_404(open_server: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client(open_server).get("/no/such/route", cast_to=object)
    assert_openai_error(httpx.get(open_server + "/v1/nope"), 404, "unknown_url")


def test_wrong_method_is_405(open_server: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client(open_server).post("/models", cast_to=object, body={})
    assert info.value.status_code == 405
    error = assert_openai_error(httpx.delete(open_server + "/health"), 405, "method_not_allowed")
    assert "DELETE" in error["message"]


def test_trailing_slashes_are_served_in_place_not_redirected(open_server: str) -> None:
    r = httpx.get(open_server + "/v1/models/", follow_redirects=False)
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert_openai_error(
        httpx.get(open_server + "/v1/chat/completions//", follow_redirects=False), 405, "method_not_allowed"
    )


def test_body_over_limit_is_413(open_server: str) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    with pytest.raises(openai.APIStatusError) as info:
        client(open_server).post("/chat/completions", cast_to=object, body=big)
    assert info.value.status_code == 413
    assert_openai_error(httpx.post(open_server + "/v1/models", content=b"y" * (2 << 20)), 413, "request_too_large")


def test_every_response_carries_a_request_id(open_server: str) -> None:
    raw = client(open_server).models.with_raw_response.list()
    assert raw.headers["x-request-id"].startswith("req_")
    echoed = httpx.get(open_server + "/health", headers={"x-request-id": "my-trace-1"})
    assert echoed.headers["x-request-id"] == "my-trace-1"


def test_health_and_ready(open_server: str) -> None:
    assert httpx.get(open_server + "/health").json() == {"status": "ok"}
    ready = httpx.get(open_server + "/ready")
    assert ready.status_code == 200 and "smollm2-135m-instruct" in ready.json()["models"]


def test_wrong_key_is_401(keyed_server: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(keyed_server, "sk-wrong").models.list()
    assert info.value.code == "invalid_api_key"


def test_missing_key_is_401(keyed_server: str) -> None:
    error = assert_openai_error(httpx.get(keyed_server + "/v1/models"), 401, "invalid_api_key")
    assert "API key" in error["message"]
    assert_openai_error(httpx.get(keyed_server + "/v1/models", headers={"authorization": "Basic abc"}), 401)


def test_right_keys_are_accepted(keyed_server: str) -> None:
    assert client(keyed_server, KEY).models.list().data
    assert client(keyed_server, "sk-other").models.retrieve("all-minilm-l6-v2").id == "all-minilm-l6-v2"


def test_health_needs_no_key(keyed_server: str) -> None:
    assert httpx.get(keyed_server + "/health").status_code == 200
