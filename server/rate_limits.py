"""Per-key rate limits (requests and tokens per minute) and concurrent sequences, as OpenAI reports them.

Each limit is a token bucket holding at most ``limit`` units that refills at
``limit`` per window (60 s): a key may burst its whole minute at once, then
gets one more unit every ``window / limit`` seconds. A request takes one unit
of the requests bucket when it arrives (RateLimitMiddleware); a generation
takes prompt tokens + max_tokens (per choice) from the tokens bucket once its
prompt is tokenized, as OpenAI counts at admission. Over a limit the answer
is a 429 with OpenAI's body (``type`` "requests" or "tokens", code
``rate_limit_exceeded``) and ``retry-after``/``retry-after-ms`` saying when
the bucket holds enough, which the ``openai`` SDK waits for before retrying.

Every response to a limited key carries the ``x-ratelimit-limit-*``,
``-remaining-*`` and ``-reset-*`` headers (reset: time until the bucket is
full again, as a Go duration like ``1s`` or ``6m0s``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.requests import Request

from server.engine import GenerationRequest
from server.errors import RateLimitError
from server.keys import ApiKey

DEFAULT_COMPLETION_ESTIMATE = 256  # tokens charged for a completion whose max_tokens was not given


def go_duration(seconds: float) -> str:
    """A duration as Go prints it, the way OpenAI's reset headers do: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    whole_ms = max(0, math.ceil(seconds * 1000))
    if whole_ms < 1000:
        return f"{whole_ms}ms"
    hours, rest = divmod(whole_ms, 3_600_000)
    minutes, ms = divmod(rest, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Bucket:
    """`limit` units, refilled continuously at `limit` per `window` seconds."""

    limit: int
    window: float
    level: float = -1.0
    stamp: float = 0.0

    def _refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.stamp = float(self.limit), now
        self.level = min(float(self.limit), self.level + (now - self.stamp) * self.limit / self.window)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are there (0: now); inf when it exceeds the limit."""
        self._refill(now)
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level) * self.window / self.limit)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def headers(self, kind: str, now: float) -> list[tuple[str, str]]:
        self._refill(now)
        reset = (self.limit - self.level) * self.window / self.limit
        return [
            (f"x-ratelimit-limit-{kind}", str(self.limit)),
            (f"x-ratelimit-remaining-{kind}", str(max(0, math.floor(self.level)))),
            (f"x-ratelimit-reset-{kind}", go_duration(reset)),
        ]


@dataclass
class _KeyState:
    requests: Bucket | None
    tokens: Bucket | None
    max_concurrent: int | None
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _too_many(kind: str, message: str, wait: float) -> RateLimitError:
    if math.isinf(wait):
        err = RateLimitError(message, headers={"x-should-retry": "false"})
    else:
        err = RateLimitError(
            message,
            headers={
                "retry-after": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            },
        )
    err.type = kind
    return err


class RateLimits:
    """Every key's buckets and running sequences (on app.state.limits); safe from any thread."""

    def __init__(self, rpm: int | None, tpm: int | None, max_concurrent: int | None, window: float = 60.0) -> None:
        self.rpm, self.tpm, self.max_concurrent, self.window = rpm, tpm, max_concurrent, window
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def _state(self, key: ApiKey) -> _KeyState:
        with self._lock:
            state = self._keys.get(key.id)
            if state is None:
                rpm, tpm = key.rpm or self.rpm, key.tpm or self.tpm
                state = _KeyState(
                    Bucket(rpm, self.window) if rpm else None,
                    Bucket(tpm, self.window) if tpm else None,
                    key.max_concurrent or self.max_concurrent,
                )
                self._keys[key.id] = state
            return state

    def limited(self, key: ApiKey) -> bool:
        state = self._state(key)
        return state.requests is not None or state.tokens is not None or state.max_concurrent is not None

    def take_request(self, key: ApiKey) -> None:
        """One request arrives: take a unit of the requests bucket or raise a 429 (type "requests")."""
        state = self._state(key)
        if state.requests is None:
            return
        with state.lock:
            now = time.monotonic()
            wait = state.requests.wait_for(1, now)
            if wait > 0:
                raise _too_many(
                    "requests",
                    f"Rate limit reached for requests per min (RPM): Limit "
                    f"{state.requests.limit}. Please try again in {go_duration(wait)}.",
                    wait,
                )
            state.requests.take(1, now)

    def admit(self, key: ApiKey, tokens: int, sequences: int) -> None:
        """Take `tokens` from the tokens bucket and hold `sequences` running slots, or raise a 429 for either."""
        state = self._state(key)
        with state.lock:
            now = time.monotonic()
            if state.max_concurrent is not None and sequences and state.running + sequences > state.max_concurrent:
                wait = math.inf if sequences > state.max_concurrent else 1.0
                raise _too_many(
                    "requests",
                    f"Too many concurrent sequences for this API key: {state.running} "
                    f"running, {sequences} requested, limit {state.max_concurrent}.",
                    wait,
                )
            if state.tokens is not None and tokens:
                wait = state.tokens.wait_for(tokens, now)
                if math.isinf(wait):
                    raise _too_many(
                        "tokens",
                        f"Request too large for tokens per min (TPM): Limit "
                        f"{state.tokens.limit}, Requested {tokens}. Send fewer tokens or a smaller "
                        f"max_tokens.",
                        wait,
                    )
                if wait > 0:
                    raise _too_many(
                        "tokens",
                        f"Rate limit reached for tokens per min (TPM): Limit "
                        f"{state.tokens.limit}, Requested {tokens}. Please try again in "
                        f"{go_duration(wait)}.",
                        wait,
                    )
                state.tokens.take(tokens, now)
            state.running += sequences

    def release(self, key: ApiKey, sequences: int) -> None:
        if sequences:
            state = self._state(key)
            with state.lock:
                state.running -= sequences

    def headers(self, key: ApiKey) -> list[tuple[str, str]]:
        state = self._state(key)
        with state.lock:
            now = time.monotonic()
            out = state.requests.headers("requests", now) if state.requests is not None else []
            return out + (state.tokens.headers("tokens", now) if state.tokens is not None else [])


def generation_cost(requests: Sequence[GenerationRequest], context_length: int) -> tuple[int, int]:
    """(tokens, sequences) a generation is charged at admission: prompts plus max_tokens for every choice."""
    tokens = sequences = 0
    for request in requests:
        prompt = len(request.prompt_token_ids)
        asked = request.params.max_tokens
        completion = asked if asked is not None else min(DEFAULT_COMPLETION_ESTIMATE, max(0, context_length - prompt))
        tokens += prompt + request.params.n * completion
        sequences += request.params.n
    return tokens, sequences


def admit(request: Request, tokens: int, sequences: int = 0) -> None:
    """Charge the caller's key at admission; RateLimitMiddleware releases the sequences when the response ends."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None:
        return
    request.app.state.limits.admit(key, tokens, sequences)
    request.state.held_sequences = getattr(request.state, "held_sequences", 0) + sequences
