"""Legacy completions on the wire (`POST /v1/completions`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from server.wire.chat import StreamOptions, Usage, check_stream_options

TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# text, texts, token ids or lists of token ids: decoded as Any and checked in the service (null is a 400 there)
PROMPTS = Annotated[
    Any,
    msgspec.Meta(
        extra_json_schema={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                TOKEN_IDS,
                {"type": "array", "items": TOKEN_IDS, "minItems": 1},
                {"type": "null"},
            ]
        }
    ),
]


class CompletionRequest(msgspec.Struct):
    prompt: PROMPTS = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    best_of: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None

    def __post_init__(self) -> None:  # runs while decoding: an InvalidRequestError leaves msgspec as is
        check_stream_options(self.stream, self.stream_options)


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"
