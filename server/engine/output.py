"""From accepted tokens to the events clients receive: text deltas and delivery to each request's sink.

The engine thread decides which token a sequence gets and when it finishes; an `Output` records
that, and `OutputProcessor` turns it into a TokenEvent (decoding the token through the sequence's
IncrementalDetokenizer when the engine did not) and calls the sink.

On a GPU the processor runs on its own thread: decoding and delivering 128 sequences' tokens is
milliseconds of Python a step, and on the engine thread it delayed every next step by that much.
On its own thread it overlaps the engine's kernel encoding and the device's work (MLX releases the
GIL while it evaluates). On a CPU, where that thread would compete with the matmuls for the cores,
it runs inline, as part of the step.

A sequence with stop strings is decoded on the engine thread (its text decides when it stops) and
its Outputs carry their text; every Output of a sequence goes through the same FIFO, so a
sequence's events keep their order either way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.request import TokenEvent
from server.engine.sampling import TokenSample
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)

YIELD_EVERY = 16  # events the output thread builds between offers of the GIL

Sink = Callable[[list[TokenEvent]], None]  # one call per request per step: that step's events, in order


@dataclass
class Output:
    """One event to build: `text`, then the decoded `decode` token (if any), then the flush (if `flush`)."""

    seq: Sequence
    sink: Sink
    sample: TokenSample | None
    text: str
    decode: int | None = None  # a token the detokenizer has not seen yet
    flush: bool = False  # the sequence ended: release held-back text
    finish_reason: str | None = None
    completion_tokens: int = 0  # snapshots: the engine thread goes on changing the sequence
    error: str | None = None
    error_kind: str | None = None
    first: bool = False  # the sequence's first token (carries prompt logprobs, when asked)


class OutputProcessor:
    """Builds and delivers events, inline or on a thread of its own (`threaded`)."""

    def __init__(self, threaded: bool) -> None:
        self.threaded = threaded
        # called after each delivered batch (a step's events): the engine-core process sends them then
        self.on_batch: Callable[[], None] | None = None
        self._queue: queue.SimpleQueue[list[Output] | None] = queue.SimpleQueue()
        self._pending: list[Output] = []
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, name="mlx-engine-output", daemon=True)
            self._thread.start()

    def put(self, output: Output) -> None:
        """Queue an event; it is delivered at the next `flush` (a step's events leave together)."""
        self._pending.append(output)

    def flush(self) -> None:
        """Deliver (inline) or hand over (threaded) every event queued so far, in order."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        if self.threaded:
            self._queue.put(batch)
        else:
            self._deliver(batch)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop the thread."""
        self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self._deliver(batch)

    def _deliver(self, batch: list[Output]) -> None:
        """Build the batch's events and hand each request its own, in one sink call (the events of a request's
        `n` sequences together, in the order they were queued)."""
        threaded = self.threaded
        per_sink: dict[Sink, list[TokenEvent]] = {}
        for i, output in enumerate(batch):
            if threaded and i and not i % YIELD_EVERY:
                # let the engine thread have the GIL if it wants it: otherwise it waits out the whole
                # switch interval (5 ms) behind this loop, every step
                time.sleep(0)
            try:
                event = self._event(output)
            except Exception:  # a decoding failure must not silence the sequences after it
                log.exception("building the event of %s failed", output.seq.request_id)
                continue
            events = per_sink.get(output.sink)
            if events is None:
                per_sink[output.sink] = [event]
            else:
                events.append(event)
        for sink, events in per_sink.items():
            self.send(sink, events, batch_done=False)
        if self.on_batch is not None:
            self.on_batch()

    def send(self, sink: Sink, events: list[TokenEvent], batch_done: bool = True) -> None:
        """Hand a request its events now (a request that could not start sends its error events this way)."""
        try:
            sink(events)
        except Exception:  # a closed event loop on the other side: the request is gone
            log.debug("dropping events for %s", events[0].request_id, exc_info=True)
        if batch_done and self.on_batch is not None:
            self.on_batch()

    @staticmethod
    def _event(output: Output) -> TokenEvent:
        seq, sample = output.seq, output.sample
        text = output.text
        if output.decode is not None:
            text += seq.detokenizer.add(output.decode)
        if output.flush:
            text += seq.detokenizer.flush()
        return TokenEvent(
            request_id=seq.request_id,
            index=seq.index,
            token_id=sample.token_id if sample else None,
            text=text,
            logprob=sample.logprob if sample else None,
            top_logprobs=sample.top_logprobs if sample else None,
            finish_reason=output.finish_reason,
            prompt_tokens=len(seq.prompt_token_ids),
            cached_tokens=seq.num_cached_tokens,
            completion_tokens=output.completion_tokens,
            error=output.error,
            error_kind=output.error_kind,
            prompt_logprobs=seq.prompt_logprobs if output.first and seq.prompt_logprobs else None,
        )
