"""Embeddings on the wire (`POST /v1/embeddings`)."""

from __future__ import annotations

from typing import Literal

import msgspec

from server.wire.completions import PROMPTS


class EmbeddingRequest(msgspec.Struct):
    input: PROMPTS = None  # str | list[str] | list[int] | list[list[int]]: checked in the service
    model: str | None = None
    encoding_format: str | None = None  # "float" | "base64"; the openai SDK sends "base64" by default
    dimensions: int | None = None
    user: str | None = None
    truncate: bool | None = None  # extension: cut over-long inputs to the model's maximum instead of a 400


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
