"""What the HTTP layer hands the engine (GenerationRequest; ValidRequest once checked) and what comes back
(TokenEvent)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from server.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to continue `params.n` times.

    `salt` scopes KV reuse: the model or adapter id and the tenant, so two
    tenants or a base and a fine-tuned model never read each other's blocks.
    `conversation_key` pins the finished turn's KV for the next turn. `streamed`: the client reads
    tokens as they come (SSE), so the scheduler bounds how long prompts stall them (see scheduler.py);
    a non-streamed request is answered at its end, where only its completion time counts.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    conversation_key: str | None = None
    salt: bytes = b""
    streamed: bool = True


@dataclass(frozen=True)
class ValidRequest(GenerationRequest):
    """A request `Engine.validate` checked against its model's limits, with the number of tokens it may generate
    (asked, or all the context left). Only `ModelLimits.check` makes one; the engine never checks it again."""

    max_new_tokens: int = 0


class TokenEvent(msgspec.Struct, array_like=True, gc=False):
    """One step's output for one sequence; the last event of a sequence has a finish_reason.

    A msgspec Struct (an array on the wire, untracked by the cycle collector: it holds no cycles): the
    engine process sends a step's events as they are (core_protocol.py), and tens of thousands are made
    a second at full batch."""

    request_id: str
    index: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None  # "pool_exhausted" | "internal" | "unavailable" when finish_reason is "error"
    # with the first generated token, when asked: (token id, logprob, top alternatives) of prompt tokens 1..n-1
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


def unavailable_events(request_id: str, indices: Iterable[int], why: str) -> list[TokenEvent]:
    """The last events of a request's sequences when no engine can run them (a 503 the client may retry)."""
    return [
        TokenEvent(request_id, index, None, "", finish_reason="error", error=why, error_kind="unavailable")
        for index in indices
    ]
