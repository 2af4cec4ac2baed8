"""`/v1/models` and OpenAI-shaped errors, as the SDK and raw HTTP clients see them."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_sdk_lists_models(client: openai.OpenAI) -> None:
    page = client.models.list()
    assert page.data, "no models listed"
    for model in page.data:
        assert model.object == "model" and model.id and isinstance(model.created, int) and model.owned_by


def test_sdk_retrieves_a_listed_model(client: openai.OpenAI, chat_model: str) -> None:
    assert client.models.retrieve(chat_model).id == chat_model


def test_raw_list_shape(http: httpx.Client) -> None:
    body = http.get("/models").json()
    assert body["object"] == "list" and isinstance(body["data"], list)
    assert set(body["data"][0]) >= {"id", "object", "created", "owned_by"}


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-org/no-such-model")
    assert info.value.code == "model_not_found"


def test_error_body_shape(http: httpx.Client) -> None:
    response = http.get("/models/definitely-missing")
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    response = http.get("/no-such-endpoint")
    assert response.status_code == 404 and "error" in response.json()


def test_request_id_header(http: httpx.Client) -> None:
    assert http.get("/models").headers.get("x-request-id")
