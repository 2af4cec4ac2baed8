"""`/v1/embeddings` through the openai SDK and raw HTTP on the default all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def base(registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(Settings(), registry)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def raw(base: str, body: dict) -> httpx.Response:
    return httpx.post(base + "/v1/embeddings", json=body, timeout=60)


def test_default_call_base64_and_float_agree(client: openai.OpenAI, base: str) -> None:
    texts = ["The cat sat on the mat.", "Un chat est assis sur le tapis."]
    default = client.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1] and default.model == MODEL
    for a, b in zip(default.data, floats.data):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert abs(np.linalg.norm(b.embedding) - 1) < 1e-3 and len(b.embedding) == 384
    body = raw(base, {"model": MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    assert default.usage.prompt_tokens == default.usage.total_tokens > 0


def test_dimensions_is_a_unit_prefix_direction(client: openai.OpenAI) -> None:
    full = np.array(
        client.embeddings.create(model=MODEL, input="hello world", encoding_format="float").data[0].embedding
    )
    short = np.array(
        client.embeddings.create(model=MODEL, input="hello world", dimensions=64, encoding_format="float")
        .data[0]
        .embedding
    )
    assert short.shape == (64,) and abs(np.linalg.norm(short) - 1) < 1e-3
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_token_id_inputs_match_text(client: openai.OpenAI, registry: ModelRegistry) -> None:
    encoder = registry.get(MODEL).encoder
    ids = encoder.tokenize(["graph neural networks"])[0]
    inner = ids[1:-1]  # without [CLS]/[SEP]: the server adds the model's special tokens
    by_text = client.embeddings.create(model=MODEL, input="graph neural networks", encoding_format="float")
    by_ids = client.embeddings.create(model=MODEL, input=[inner, inner], encoding_format="float")
    assert np.allclose(by_text.data[0].embedding, by_ids.data[1].embedding, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input[0]"),
        ({"input": ["ok", "   "]}, "input[1]"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": "x", "dimensions": 385}, "dimensions"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[10**9]]}, "input[0]"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": ["short", "word " * 600]}, "input[1]"),
    ],
)
def test_bad_inputs_are_400_naming_the_param(base: str, body: dict, param: str) -> None:
    response = raw(base, {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_truncate_extension(base: str) -> None:
    response = raw(base, {"model": MODEL, "input": "word " * 600, "truncate": True})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] <= 512


def test_chat_model_on_embeddings_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2-135m-instruct", input="x")


def test_concurrent_requests_are_micro_batched(base: str, registry: ModelRegistry) -> None:
    batcher = registry.get(MODEL).batcher
    before = batcher.batches

    async def many() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/v1/embeddings",
                        json={"model": MODEL, "input": f"sentence number {i}", "encoding_format": "float"},
                    )
                    for i in range(24)
                )
            )
        return [r.status_code for r in responses]

    assert set(asyncio.run(many())) == {200}
    assert batcher.batches - before < 24  # some requests shared an encoder call


def test_small_request_is_not_stuck_behind_a_large_one(registry: ModelRegistry) -> None:
    """A one-input request sent while a 640-input request is being embedded finishes first:
    encoder calls share their slots among the waiting requests."""
    batcher = registry.get(MODEL).batcher
    encoder = registry.get(MODEL).encoder
    big = encoder.tokenize([f"document {i} talks about topic {i % 7} at some length" for i in range(640)])
    small = encoder.tokenize(["a short query"])
    order: list[str] = []

    async def run(name: str, ids: list[list[int]], delay: float) -> np.ndarray:
        await asyncio.sleep(delay)
        out = await batcher.embed(ids)
        order.append(name)
        return out

    async def both() -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.gather(run("big", big, 0.0), run("small", small, 0.05))

    big_out, small_out = asyncio.run(both())
    assert order == ["small", "big"]
    assert big_out.shape == (640, encoder.dimensions)
    np.testing.assert_allclose(small_out, encoder.embed_ids(small), atol=1e-5)
    np.testing.assert_allclose(big_out[:5], encoder.embed_ids(big[:5]), atol=1e-5)


def test_chat_keeps_decoding_while_embeddings_run(base: str) -> None:
    """Chat and embeddings share the machine: a chat stream keeps producing tokens while a
    256-input embedding request is being served, and both finish."""
    import time

    texts = [f"passage {i}: the committee reviewed budget item {i} and postponed the vote" for i in range(256)]
    token_times: list[float] = []
    window: list[float] = []

    async def chat(http: httpx.AsyncClient) -> None:
        body = {
            "model": "smollm2-135m-instruct",
            "stream": True,
            "max_tokens": 40,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    token_times.append(time.monotonic())

    async def embed(http: httpx.AsyncClient) -> None:
        while len(token_times) < 3:  # start once the chat is decoding
            await asyncio.sleep(0.01)
        window.append(time.monotonic())
        response = await http.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
        window.append(time.monotonic())
        assert response.status_code == 200 and len(response.json()["data"]) == 256

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            await asyncio.gather(chat(http), embed(http))

    asyncio.run(main())
    during = [t for t in token_times if window[0] <= t <= window[1]]
    assert len(token_times) >= 10
    assert during, f"no chat token during the {window[1] - window[0]:.2f}s embedding request"
