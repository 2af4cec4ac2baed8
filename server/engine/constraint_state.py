"""One sequence's grammar state while it decodes, and a decode step's token masks.

Owns `SequenceConstraint` (an llguidance matcher behind a think-block gate: the next-token mask, advancing by
sampled tokens, finished when the grammar is complete), `fill_masks` (a step's masks for all constrained rows
as one packed bitmask, computed in parallel across rows), `apply_bitmask` (applies it to a (B, V) logits
matrix) and `client_message` (an llguidance error without the grammar text it quotes).

The gate lets a thinking model reason before its constrained answer. With `after` (the end-of-reasoning
marker's token ids) alone, the sequence is free until it has generated them: the prompt opened the think
block. With `opens` (the start marker's ids) too, the block is optional: the first token may be the start
marker (or the grammar's), and only an output that begins with the whole start marker is free until the
end marker; any other first token is the grammar's, which constrains from there. With `budget`, a block
that has run that many tokens gets its end marker forced, so a model that will not stop reasoning still
reaches its constrained answer.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

# llguidance's messages quote the grammar: source lines ("  2 | call: %json {...}", a caret line) at compile
# time, the matcher's <state> and <grammar> at run time. Clients get the message without them.
_SOURCE_LINE = re.compile(r"^\s*(?:\d+ \|.*|\^+)\s*$")
_DECIDING, _WAITING, _ACTIVE = "deciding", "waiting", "active"

log = logging.getLogger(__name__)


def client_message(message: str) -> str:
    """An llguidance error message without the grammar source and matcher state it quotes."""
    message = message.split("<state>", 1)[0].split("<grammar>", 1)[0]
    lines = [line for line in message.splitlines() if not _SOURCE_LINE.match(line)]
    return "\n".join(lines).strip() or "the grammar matcher failed"


class SequenceConstraint:
    """One sequence's grammar state (an llguidance LLMatcher) behind the think-block gate.

    States: "deciding" (with `opens`: the output may still begin the think block), "waiting" (inside the
    block, free until `after`), "active" (the grammar constrains)."""

    __slots__ = (
        "_after", "_budget", "_matched", "_matcher", "_opens", "_spent", "_state", "_tail", "_taken", "vocab_size",
    )  # fmt: skip

    def __init__(
        self,
        matcher: Any,
        vocab_size: int,
        after: tuple[int, ...] = (),
        opens: tuple[int, ...] = (),
        budget: int | None = None,
    ) -> None:
        if (opens or budget is not None) and not after:
            raise ValueError("a think block that may open (`opens`) or has a budget needs its end marker (`after`)")
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._after = tuple(after)
        self._opens = tuple(opens)
        self._state = _DECIDING if opens else _WAITING if after else _ACTIVE
        self._tail: tuple[int, ...] = ()
        self._matched = 0  # start-marker tokens generated so far (deciding)
        self._taken = 0  # of those, tokens the grammar took too (-1: the grammar cannot follow the marker)
        self._budget = budget  # the most tokens the block may run before its end marker is forced
        self._spent = 0  # tokens inside the block so far

    @property
    def active(self) -> bool:
        """True once the grammar alone constrains (not while the output may open, or is in, a think block)."""
        return self._state == _ACTIVE

    @property
    def waiting(self) -> bool:
        """True inside the think block: every token is allowed until the end marker."""
        return self._state == _WAITING

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    @property
    def mask_matcher(self) -> Any:
        """The matcher whose mask this step needs (None: the grammar has no say this step)."""
        if self._state == _ACTIVE or (self._state == _DECIDING and self._taken >= 0):
            return self._matcher
        return None

    def patch_mask(self, words: np.ndarray) -> None:
        """While deciding, add the start marker's next token to the grammar's mask (or allow only it, once
        the grammar cannot follow the marker's tokens); inside the block, allow everything."""
        if self._state == _WAITING:
            forced = self._forced_end()
            words.fill(-1 if forced is None else 0)
            if forced is not None:
                words.view(np.uint32)[forced // 32] |= np.uint32(1 << (forced % 32))
        elif self._state == _DECIDING:
            if self._taken < 0:
                words.fill(0)
            token = self._opens[self._matched]
            words.view(np.uint32)[token // 32] |= np.uint32(1 << (token % 32))

    def fill_mask(self, bitmask: np.ndarray, row: int = 0) -> None:
        """Write the next token's allowed set into bitmask[row] (int32 words, bit i of word w = token 32w+i)."""
        target = bitmask[row]
        if bitmask.dtype != np.int32 or not target.flags["C_CONTIGUOUS"] or target.size != self.mask_words:
            raise ValueError(f"mask row must be {self.mask_words} contiguous int32 words")
        matcher = self.mask_matcher
        if matcher is not None:
            matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)
        self.patch_mask(target)

    def allowed_token_ids(self) -> np.ndarray:
        """The token ids allowed next (for tests and debugging; sampling uses `fill_masks`)."""
        bitmask = np.zeros((1, self.mask_words), dtype=np.int32)
        self.fill_mask(bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.flatnonzero(bits)

    def advance(self, token_id: int) -> None:
        """Consume a sampled token. A token the grammar does not allow puts the constraint in an error state
        (`finished` and `error` then say so); it never raises for that. Deciding, the start marker's tokens
        lead into the block (the grammar restarts after it); waiting, tokens only move the wait along and
        the token that completes `after` starts the grammar."""
        token_id = int(token_id)
        if self._state == _DECIDING:
            if self._decide(token_id):
                return
        elif self._state == _WAITING:
            self._spent += 1
            self._tail = (*self._tail, token_id)[-len(self._after) :]
            if self._tail == self._after:
                self._state = _ACTIVE
            return
        self._matcher.consume_token(token_id)
        if self._matcher.is_error():
            log.error("constrained decoding failed at token %d: %s", token_id, self._matcher.get_error())

    def _forced_end(self) -> int | None:
        """Past the budget, the end marker's next token (after the part of it the block already ends with)."""
        if self._budget is None or self._spent < self._budget:
            return None
        for k in range(min(len(self._after) - 1, len(self._tail)), 0, -1):
            if self._tail[-k:] == self._after[:k]:
                return self._after[k]
        return self._after[0]

    def _decide(self, token_id: int) -> bool:
        """Deciding: True when the token was the start marker's (taken here), False when the grammar takes it."""
        if token_id != self._opens[self._matched]:
            self._state = _ACTIVE  # not a think block: the grammar's from here (it already has any shared tokens)
            return False
        if self._taken >= 0 and self._matcher.validate_tokens([token_id]) == 1:
            self._matcher.consume_token(token_id)  # the marker's token is the grammar's too, so far
            self._taken += 1
        else:
            if self._taken > 0:
                self._matcher.rollback(self._taken)
            self._taken = -1
        self._matched += 1
        if self._matched == len(self._opens):
            if self._taken > 0:
                self._matcher.rollback(self._taken)
            self._state = _WAITING
        return True

    @property
    def finished(self) -> bool:
        """True when no further token but EOS is allowed (grammar complete), or after an error."""
        return self._state == _ACTIVE and self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete match (EOS allowed); False before the grammar starts."""
        return self._state == _ACTIVE and self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return client_message(self._matcher.get_error() or "")


_executor: Any = None
_executor_lock = threading.Lock()


def _parallel_executor() -> Any:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                from llguidance import LLExecutor

                _executor = LLExecutor()
    return _executor


def fill_masks(rows: Sequence[tuple[int, SequenceConstraint]], batch: int, vocab: int) -> np.ndarray:
    """A (batch, ceil(vocab/32)) int32 bitmask: the grammar's allowed tokens for each (row, constraint),
    every token for the other rows (and for constraints inside a think block). Rows whose grammar has a
    say are computed in parallel when there are several."""
    words = (vocab + 31) // 32
    bitmask = np.full((batch, words), -1, dtype=np.int32)
    for _, constraint in rows:
        if constraint.vocab_size != vocab:
            raise ValueError(f"constraint built for a vocabulary of {constraint.vocab_size}, logits have {vocab}")
    matched = [(c.mask_matcher, row) for row, c in rows if c.mask_matcher is not None]
    if len(matched) == 1:
        matcher, row = matched[0]
        matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, words * 4)
    elif matched:
        _parallel_executor().unsafe_compute_mask_ptr(matched, bitmask.ctypes.data, words * 4, batch)
    for row, constraint in rows:
        constraint.patch_mask(bitmask[row])
    return bitmask


def _apply(x: mx.array, words: mx.array) -> mx.array:
    bit = mx.left_shift(mx.array(1, dtype=mx.uint32), mx.arange(32, dtype=mx.uint32))
    allowed = (words[:, :, None] & bit) != 0
    allowed = allowed.reshape(x.shape[0], -1)[:, : x.shape[1]]
    return mx.where(allowed, x, mx.array(float("-inf"), dtype=x.dtype))


_apply_compiled = mx.compile(_apply)


def apply_bitmask(x: mx.array, bitmask: np.ndarray) -> mx.array:
    """x (B, V) with the tokens whose bit is 0 in bitmask (B, ceil(V/32)) set to -inf. Returns a new array."""
    return _apply_compiled(x, mx.array(bitmask.view(np.uint32)))
