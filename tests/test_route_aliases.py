"""OpenAI's routes without `/v1` (`/chat/completions`, `/models`, ...), as llama.cpp's server and mlx_lm.server
serve them: the `openai` SDK with a bare-host base_url, and auth, rate limits, body limits, metrics labels and
trailing slashes behaving exactly as on the `/v1` route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.aliases import VersionPrefixMiddleware
from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
KEY = "sk-alias"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("aliases"), api_keys=(KEY,), max_body_mb=0.5, max_file_mb=2.0)
    with running_server(create_app(settings, registry)) as url:
        yield url


@pytest.fixture(scope="module")
def bare(base: str) -> openai.OpenAI:
    """The SDK configured with the bare host, as clients of llama.cpp's server often are."""
    return openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)


def test_models_chat_completions_and_embeddings_through_the_sdk(bare: openai.OpenAI) -> None:
    assert CHAT in {m.id for m in bare.models.list().data}
    assert bare.models.retrieve(CHAT).id == CHAT
    chat = bare.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.object == "chat.completion" and chat.choices[0].message.content is not None
    chunks = list(
        bare.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    legacy = bare.completions.create(model=CHAT, prompt="The sky is", max_tokens=2)
    assert legacy.object == "text_completion"
    vectors = bare.embeddings.create(model=EMBED, input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384


def test_responses_and_their_sub_routes(bare: openai.OpenAI) -> None:
    r = bare.responses.create(model=CHAT, input="Hi", max_output_tokens=2)
    assert r.id.startswith("resp_")
    assert bare.responses.retrieve(r.id).id == r.id
    assert bare.responses.input_items.list(r.id).data[0].type == "message"
    bare.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        bare.responses.retrieve(r.id)


def test_files_and_fine_tuning(bare: openai.OpenAI) -> None:
    uploaded = bare.files.create(file=("data.jsonl", b'{"prompt": "a", "completion": "b"}\n'), purpose="fine-tune")
    assert bare.files.retrieve(uploaded.id).filename == "data.jsonl"
    assert uploaded.id in {f.id for f in bare.files.list()}
    assert bare.files.content(uploaded.id).read() == b'{"prompt": "a", "completion": "b"}\n'
    assert bare.files.delete(uploaded.id).deleted
    assert bare.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        bare.fine_tuning.jobs.retrieve("ftjob-nope")


def test_auth_applies_to_the_alias(base: str) -> None:
    for method, path in [
        ("GET", "/models"),
        ("POST", "/chat/completions"),
        ("GET", "/files"),
        ("GET", "/models/" + CHAT),
        ("DELETE", "/responses/resp_x"),
    ]:
        response = httpx.request(method, base + path)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base + "/models", headers=AUTH).status_code == 200
    assert httpx.get(base + "/models", headers={"authorization": "Bearer sk-wrong"}).status_code == 401


def test_trailing_slash_and_percent_encoded_ids(base: str) -> None:
    assert httpx.get(base + "/models/", headers=AUTH).json()["object"] == "list"
    assert httpx.get(base + "/models/" + CHAT + "/", headers=AUTH).json()["id"] == CHAT
    missing = httpx.get(base + "/models/org%2Fno-such-model", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def _upload(base: str, name: str, size: int) -> httpx.Response:
    return httpx.post(
        base + "/files", headers=AUTH, data={"purpose": "fine-tune"}, files={"file": (name, b"x" * size)}, timeout=60
    )


def test_body_limits_are_the_v1_routes_own(base: str) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 600_000}]}
    too_large = httpx.post(base + "/chat/completions", json=big, headers=AUTH)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    # /v1/files has its own, larger limit: a 1 MB upload passes the 0.5 MB body limit on the alias too
    upload = _upload(base, "big.jsonl", 1_000_000)
    assert upload.status_code == 200, upload.text
    assert upload.json()["bytes"] == 1_000_000
    over = _upload(base, "huge.jsonl", 3_000_000)
    assert over.status_code == 413


def test_unknown_bare_paths_and_wrong_methods(base: str) -> None:
    for path in ("/nope", "/chat/nope", "/v1/v1/models", "/v1/health", "/modelsx"):
        response = httpx.get(base + path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "unknown_url"
        assert path in response.json()["error"]["message"]  # the path the client sent, not a rewritten one
    wrong = httpx.get(base + "/chat/completions", headers=AUTH)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}  # bare routes of our own are untouched


def _requests_total(base: str, route: str, method: str, status: str) -> float:
    text = httpx.get(base + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mlx_dropin_requests_total" and sample.labels == {
                "route": route,
                "method": method,
                "status": status,
            }:
                return sample.value
    return 0.0


def test_metrics_count_the_alias_under_the_v1_route(base: str) -> None:
    before = _requests_total(base, "/v1/files/{file_id}", "GET", "404")
    for _ in range(3):
        assert httpx.get(base + "/files/file-nope", headers=AUTH).status_code == 404
    deadline = time.monotonic() + 5
    while _requests_total(base, "/v1/files/{file_id}", "GET", "404") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # a request is counted once its response has gone
    assert _requests_total(base, "/v1/files/{file_id}", "GET", "404") == before + 3
    assert '/files/{file_id}"' not in httpx.get(base + "/metrics").text.replace('/v1/files/{file_id}"', "")


def test_rate_limits_share_one_bucket(registry: ModelRegistry, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=("sk-r",), rate_limit_rpm=2, rate_limit_window=3600.0)
    with running_server(create_app(settings, registry)) as url:
        headers = {"authorization": "Bearer sk-r"}
        first = httpx.get(url + "/models", headers=headers)
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "1"
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 200
        limited = httpx.get(url + "/models", headers=headers)
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_openapi_lists_only_the_v1_paths(base: str) -> None:
    paths = httpx.get(base + "/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in paths and not any(p.startswith("/chat") for p in paths)


def test_an_unprefixed_route_of_the_app_wins_over_the_alias() -> None:
    async def which(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.url.path)

    routes = [Route("/v1/status", which), Route("/status", which, methods=["POST"]), Route("/v1/items/{id}", which)]
    app = Starlette(routes=routes, middleware=[Middleware(VersionPrefixMiddleware, routes=routes)])
    with TestClient(app) as test:
        assert test.post("/status").text == "/status"
        assert test.get("/status").status_code == 405  # the app's own /status, though /v1/status has a GET
        assert test.get("/items/7").text == "/v1/items/7"
        assert test.get("/v1/items/7").text == "/v1/items/7"
        assert test.get("/items").status_code == 404
