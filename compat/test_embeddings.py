"""Embeddings as the openai SDK and LangChain use them."""

from __future__ import annotations

import math
import os

import openai
import pytest


@pytest.fixture(scope="session")
def embedding_model(client: openai.OpenAI) -> str:
    chosen = os.environ.get("COMPAT_EMBEDDING_MODEL")
    if chosen:
        return chosen
    ids = [m.id for m in client.models.list().data]
    if "all-minilm-l6-v2" not in ids:
        pytest.skip("no embedding model named; set COMPAT_EMBEDDING_MODEL")
    return "all-minilm-l6-v2"


def test_sdk_embeddings_default_base64(client: openai.OpenAI, embedding_model: str) -> None:
    r = client.embeddings.create(model=embedding_model, input=["first", "second"])
    assert r.object == "list" and [d.index for d in r.data] == [0, 1]
    assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-2 for d in r.data)


def test_sdk_embeddings_float(client: openai.OpenAI, embedding_model: str) -> None:
    r = client.embeddings.create(model=embedding_model, input="hello", encoding_format="float")
    assert isinstance(r.data[0].embedding[0], float) and r.usage.prompt_tokens > 0


def test_langchain_openai_embeddings(base_url: str, api_key: str, embedding_model: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    # tiktoken's encoding files cannot be fetched offline: send strings, not cl100k token ids
    emb = OpenAIEmbeddings(base_url=base_url, api_key=api_key, model=embedding_model, check_embedding_ctx_length=False)
    docs = emb.embed_documents(["a cat", "a dog", "a car"])
    query = emb.embed_query("a kitten")
    assert len(docs) == 3 and len(query) == len(docs[0])


def test_raw_base64_is_little_endian_float32(http, embedding_model: str) -> None:
    import base64
    import struct

    as_b64 = http.post("/embeddings", json={"model": embedding_model, "input": "x", "encoding_format": "base64"})
    as_float = http.post("/embeddings", json={"model": embedding_model, "input": "x", "encoding_format": "float"})
    assert as_b64.status_code == as_float.status_code == 200
    raw = base64.b64decode(as_b64.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    floats = as_float.json()["data"][0]["embedding"]
    assert len(decoded) == len(floats) and max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6


def test_dimensions_and_bad_inputs(http, embedding_model: str) -> None:
    ok = http.post(
        "/embeddings", json={"model": embedding_model, "input": "x", "dimensions": 8, "encoding_format": "float"}
    )
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 8
    for body, param in [
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": "x", "dimensions": 100000}, "dimensions"),
    ]:
        r = http.post("/embeddings", json={"model": embedding_model, **body})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
