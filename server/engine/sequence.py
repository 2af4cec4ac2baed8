"""A sequence: one generation's tokens, KV bookkeeping and status.

Statuses are ordered: everything after PREEMPTED is finished, so "finished"
is one comparison, and FINISH_REASONS maps finished statuses to OpenAI's
finish_reason. The scheduler moves ``num_computed_tokens`` (tokens whose KV
is in the pool) up to ``num_tokens - 1``; the last token is always fed by a
decode step, which yields the logits for the next one.

    prompt tokens                 | output tokens
    [p0 p1 ... reused | computed | last] s0 s1 ...
     \\__ prefix hit _/            ^ fed by the next decode step
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.sampling import SamplingParams, SequenceSampler


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self > SequenceStatus.PREEMPTED


FINISH_REASONS: dict[SequenceStatus, str] = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)  # identity, not field-by-field: the scheduler tests membership every step
class Sequence:
    """One generated completion (a request with n > 1 has n of them)."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    sampler: SequenceSampler
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    salt: bytes = b""
    conversation_key: str | None = None
    streamed: bool = True  # its client reads tokens as they come (GenerationRequest.streamed)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the pool at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    admitted_once: bool = False
    error: str | None = None
    error_kind: str | None = None  # "pool_exhausted" | "internal"
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """One token without building the whole prompt + output list."""
        prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < prompt else self.output_token_ids[position - prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_prefill(self) -> int:
        """Tokens to compute before this sequence can decode (all but the last)."""
        return max(0, self.num_tokens - 1 - self.num_computed_tokens)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
