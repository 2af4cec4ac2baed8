"""Embeddings: inputs (text or the model's own token ids) -> micro-batched encoder -> OpenAI's list.

`encoding_format: "base64"` (what the openai SDK asks for by default) is
little-endian float32, standard base64 with padding. `dimensions` keeps the
first N components and re-normalizes. Inputs over the model's maximum length
are a 400 naming the index, unless the request sets the extension field
`truncate: true`.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from server.errors import InvalidRequestError
from server.registry import ServedModel
from server.serving.batch_input import batch_items
from server.wire.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage

MAX_INPUTS = 2048
MAX_TOTAL_TOKENS = 300_000


def input_items(raw: Any) -> list[str | list[int]]:
    """Every accepted `input` shape as a list of texts and/or token-id lists."""
    items = batch_items(raw, empty_ids_allowed=False)
    if items is None:
        raise InvalidRequestError(
            "'input' must be a non-empty string, a list of strings, a list of token ids, or a list of token-id lists.",
            param="input",
        )
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"'input' may hold at most {MAX_INPUTS} items, got {len(items)}.", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            raise InvalidRequestError(f"input[{i}] is empty; every input must contain text.", param=f"input[{i}]")
    return items


def token_ids(items: list[str | list[int]], served: ServedModel, truncate: bool) -> list[list[int]]:
    encoder = served.loaded_encoder
    texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
    encoded = dict(zip((i for i, _ in texts), encoder.tokenize([t for _, t in texts]))) if texts else {}
    wrap = encoder.special_tokens()
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = encoded[i]
        else:
            if any(not 0 <= t < encoder.vocab_size for t in item):
                raise InvalidRequestError(
                    f"input[{i}] has token ids outside the model's vocabulary (0..{encoder.vocab_size - 1}).",
                    param=f"input[{i}]",
                )
            ids = [*wrap[0], *item, *wrap[1]]
        if len(ids) > encoder.max_length:
            if not truncate:
                raise InvalidRequestError(
                    f"input[{i}] is {len(ids)} tokens, over this model's maximum of {encoder.max_length}. Shorten "
                    f'it, or send "truncate": true to cut it.',
                    param=f"input[{i}]",
                    code="context_length_exceeded",
                )
            ids = ids[: encoder.max_length - len(wrap[1])] + list(wrap[1])
        out.append(ids)
    total = sum(len(ids) for ids in out)
    if total > MAX_TOTAL_TOKENS:
        raise InvalidRequestError(
            f"The request holds {total} tokens, over the limit of {MAX_TOTAL_TOKENS}.", param="input"
        )
    return out


def check_request(body: EmbeddingRequest, served: ServedModel) -> None:
    if body.encoding_format not in (None, "float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dims = body.dimensions
    most = served.loaded_encoder.dimensions
    if dims is not None and not 1 <= dims <= most:
        raise InvalidRequestError(f"'dimensions' must be between 1 and {most} for this model.", param="dimensions")


def shape(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Truncate to `dimensions` and re-normalize (a prefix of the full vector, unit length)."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def respond(vectors: np.ndarray, body: EmbeddingRequest, served: ServedModel, num_tokens: int) -> EmbeddingList:
    data = []
    for i, vector in enumerate(shape(vectors, body.dimensions).astype("<f4")):
        value: list[float] | str = (
            base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64" else vector.tolist()
        )
        data.append(Embedding(index=i, embedding=value))
    return EmbeddingList(data=data, model=served.id, usage=EmbeddingUsage(num_tokens, num_tokens))
