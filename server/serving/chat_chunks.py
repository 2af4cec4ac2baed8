"""A streamed chat completion's chunks, one engine batch at a time: a choice's consecutive deltas of one kind
(reasoning, or content with its logprobs) joined into one chunk, tool-call deltas and the finish as chunks
of their own, each chunk's envelope encoded once (`wire/sse.py` `ChunkFrame`). A reader that fell behind
gets its pending tokens in one write; one that keeps up still gets a chunk per token.
"""

from __future__ import annotations

from server.serving.generation import SYSTEM_FINGERPRINT
from server.wire.chat import ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, TokenLogprob
from server.wire.sse import ChunkFrame


class ChatChunks:
    """One engine batch's chunks of a stream: a choice's consecutive deltas of one kind (reasoning, or content with
    its logprobs) become one chunk, so a reader that fell behind catches up in one write."""

    def __init__(self, chat_id: str, created: int, model: str) -> None:
        self.frame = ChunkFrame(
            ChatCompletionChunk(
                id=chat_id, created=created, model=model, choices=[], system_fingerprint=SYSTEM_FINGERPRINT
            )
        )
        self._pending: dict[int, tuple[str, str, list[TokenLogprob]]] = {}  # index -> (kind, text, logprobs)
        self._out: list[bytes] = []

    def add(self, index: int, kind: str, text: str, entry: TokenLogprob | None = None) -> None:
        """Text of `kind` ("reasoning" or "content"), joined to the choice's pending text of the same kind."""
        pending = self._pending.get(index)
        if pending is not None and pending[0] != kind:
            self.flush(index)
            pending = None
        if pending is None:
            pending = self._pending[index] = (kind, "", [])
        logprobs = pending[2]
        if entry is not None:
            logprobs.append(entry)
        self._pending[index] = (kind, pending[1] + text, logprobs)

    def chunk(self, index: int, delta: Delta, finish: str | None = None) -> None:
        """A chunk of its own (a tool call's delta, the finish), after the choice's pending text."""
        self.flush(index)
        self._out.append(self.frame.event([ChunkChoice(index=index, delta=delta, finish_reason=finish)]))

    def flush(self, index: int) -> None:
        pending = self._pending.pop(index, None)
        if pending is None:
            return
        kind, text, entries = pending
        if kind == "reasoning":
            choice = ChunkChoice(index=index, delta=Delta(reasoning_content=text, reasoning=text))
        else:
            logprobs = ChoiceLogprobs(content=entries) if entries else None
            choice = ChunkChoice(index=index, delta=Delta(content=text), logprobs=logprobs)
        self._out.append(self.frame.event([choice]))

    def take(self) -> bytes:
        """Every chunk so far, as one write."""
        for index in list(self._pending):
            self.flush(index)
        data, self._out = b"".join(self._out), []
        return data
