"""StepChannel: rank 0 hands every other rank the bytes of its next step, over MLX's own collectives.

There is no socket of our own: a message is an `all_sum` over the world's group
in which rank 0 contributes the bytes and every other rank zeros, so every rank
ends up with rank 0's bytes. The first collective carries a fixed frame
(`FRAME_BYTES`: the length, then the start of the message), which holds a
typical step's message whole; a longer one takes a second collective for the
rest. Collectives run in the order each rank issues them, on the same stream as
the forward passes, so a message and the forward it describes stay in step on
every rank.

A lost peer surfaces as `RankLost` (MLX raises RuntimeError naming the backend)
on whichever rank next waits for it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

FRAME_BYTES = 4096  # the first collective's size: a length word and the message's first bytes
_WORD = 4


class RankLost(RuntimeError):
    """Another rank of the world is gone (or its link is): the model cannot run any more."""


def _words(payload: bytes) -> mx.array:
    padded = payload + b"\0" * (-len(payload) % _WORD)
    return mx.array(np.frombuffer(padded, dtype=np.int32))


class StepChannel:
    """Broadcast of byte messages from rank 0 over `group` (an `mx.distributed.Group`)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.messages = 0
        self.bytes = 0
        self.largest = 0

    def _sum(self, words: mx.array) -> mx.array:
        return mx.distributed.all_sum(words, group=self.group)

    def send(self, payload: bytes) -> None:
        """Rank 0: hand `payload` to every other rank (launched now; the caller's next evaluation waits for it)."""
        head = len(payload).to_bytes(_WORD, "little", signed=True) + payload[: FRAME_BYTES - _WORD]
        rest = payload[FRAME_BYTES - _WORD :]
        try:
            # one evaluation each, in order: two independent collectives in one graph may run in either order,
            # and the other ranks take the frame first
            mx.async_eval(self._sum(_words(head.ljust(FRAME_BYTES, b"\0"))))
            if rest:
                mx.async_eval(self._sum(_words(rest)))
        except RuntimeError as exc:
            raise RankLost(f"a rank stopped answering: {exc}") from exc
        self.messages += 1
        self.bytes += len(payload)
        self.largest = max(self.largest, len(payload))

    def receive(self) -> bytes:
        """Any other rank: the next message rank 0 sent (blocks until it does)."""
        try:
            frame = self._sum(mx.zeros(FRAME_BYTES // _WORD, dtype=mx.int32))
            raw = bytes(np.asarray(frame, dtype=np.int32).tobytes())
            length = int.from_bytes(raw[:_WORD], "little", signed=True)
            payload = raw[_WORD : _WORD + min(length, FRAME_BYTES - _WORD)]
            missing = length - len(payload)
            if missing > 0:
                rest = self._sum(mx.zeros(-(-missing // _WORD), dtype=mx.int32))
                payload += bytes(np.asarray(rest, dtype=np.int32).tobytes())[:missing]
        except RuntimeError as exc:
            raise RankLost(f"rank 0 stopped answering: {exc}") from exc
        self.messages += 1
        self.bytes += len(payload)
        self.largest = max(self.largest, len(payload))
        return payload
