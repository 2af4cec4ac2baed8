"""The requests in flight, on the engine thread: each one's sequences and sink, and what a step does with a token.

    add(request, sink)   -> n Sequences (sampler, grammar, detokenizer each) into the scheduler
    accept(seq, sample)  -> EOS / stop token / stop string / grammar done / length? finish : emit
    finish(seq, status)  -> Scheduler.remove (KV kept for a completed turn), the last event; when every
                            sequence of the request ended, the request is forgotten
    abort(request_id)    -> finish what has not finished (the client left, or the step failed)

Events go out through the OutputProcessor (output.py); this table never calls a sink itself except for
a request that could not start (`reject`), whose sequences never ran.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from server.engine.constraints import ConstraintFactory
from server.engine.detokenizer import IdsToText, IncrementalDetokenizer
from server.engine.output import Output, OutputProcessor, Sink
from server.engine.request import TokenEvent, ValidRequest
from server.engine.sampling import SequenceSampler, TokenSample
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from server.engine.engine import EngineStats

log = logging.getLogger(__name__)


class RequestsInFlight:
    """Every started request's sequences and sink, from `add` until its last sequence finished."""

    def __init__(
        self,
        scheduler: Scheduler,
        output: OutputProcessor,
        constraints: ConstraintFactory,
        ids_to_text: IdsToText,
        eos_ids: frozenset[int],
        context_length: int,
        stats: EngineStats,
        lock: threading.Lock,
    ) -> None:
        self.scheduler = scheduler
        self.output = output
        self.constraints = constraints
        self.ids_to_text = ids_to_text
        self.eos_ids = eos_ids
        self.context_length = context_length
        self._stats = stats  # the engine's; `lock` guards what stats() reads from another thread
        self._lock = lock
        self._sinks: dict[str, Sink] = {}
        self._seqs: dict[str, list[Sequence]] = {}

    def add(self, request: ValidRequest, sink: Sink) -> None:
        """Make the request's `n` sequences and hand them to the scheduler."""
        max_tokens = request.max_new_tokens
        seqs = []
        grammar = request.params.grammar
        for index in range(request.params.n):
            params = request.params
            if params.seed is not None and index:
                params = replace(params, seed=params.seed + index)
            constraint = self.constraints.create(grammar) if grammar is not None else None
            sampler = SequenceSampler(params, request.prompt_token_ids, constraint)
            detok = IncrementalDetokenizer(
                self.ids_to_text, request.params.stop, request.prompt_token_ids, request.params.skip_special_tokens
            )
            seqs.append(
                Sequence(
                    request.request_id,
                    index,
                    list(request.prompt_token_ids),
                    request.params,
                    sampler,
                    detok,
                    max_tokens,
                    request.salt,
                    request.conversation_key,
                    streamed=request.streamed,
                )
            )
        self._sinks[request.request_id] = sink
        self._seqs[request.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def reject(self, request: ValidRequest, sink: Sink, exc: Exception) -> None:
        """End every sequence of a request that failed to start with an error event; undo what it added."""
        log.exception("request %s could not start", request.request_id)
        for seq in self._seqs.pop(request.request_id, []):
            self.scheduler.remove(seq)
        self._sinks.pop(request.request_id, None)
        self.output.send(
            sink,
            [
                TokenEvent(
                    request.request_id,
                    index,
                    None,
                    "",
                    finish_reason="error",
                    prompt_tokens=len(request.prompt_token_ids),
                    error=f"generation failed: {exc}",
                    error_kind="internal",
                )
                for index in range(request.params.n)
            ],
        )
        with self._lock:
            self._stats.requests_finished += 1

    def abort(self, request_id: str, status: SequenceStatus, error: str | None = None) -> None:
        """Finish the request's sequences that have not finished, with `status`."""
        for seq in self._seqs.get(request_id, []):
            if not seq.finished:
                seq.error = error
                self.finish(seq, status, "")

    def fail_everything(self, why: str) -> None:
        """End every sequence with an "unavailable" error (the engine cannot run any more)."""
        for seqs in list(self._seqs.values()):
            for seq in seqs:
                if not seq.finished:
                    seq.error, seq.error_kind = why, "unavailable"
                    self.finish(seq, SequenceStatus.FINISHED_ERROR, "")

    def abort_everything(self) -> None:
        for request_id in list(self._seqs):
            self.abort(request_id, SequenceStatus.FINISHED_ABORTED)

    def accept(self, seq: Sequence, sample: TokenSample) -> None:
        """Append a decoded token; finish the sequence if it stops here, else queue its event."""
        token = sample.token_id
        seq.output_token_ids.append(token)
        seq.sampler.record(token)
        self._stats.generated_tokens += 1
        params = seq.params
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self.finish(seq, SequenceStatus.FINISHED_STOPPED, "", sample)  # the EOS token is not text
            return
        # stop strings: the text decides when the sequence stops, so decode it here; else the output side does
        text, pending = (seq.detokenizer.add(token), None) if params.stop else ("", token)
        constraint = seq.sampler.constraint
        if params.stop and seq.detokenizer.stopped:
            self.finish(seq, SequenceStatus.FINISHED_STOPPED, text, sample)
        elif constraint is not None and constraint.finished:  # grammar complete: only EOS could follow
            if constraint.error:
                seq.error, seq.error_kind = f"constrained decoding failed: {constraint.error}", "internal"
            status = SequenceStatus.FINISHED_ERROR if constraint.error else SequenceStatus.FINISHED_STOPPED
            self.finish(seq, status, text, sample, pending)
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.context_length:
            self.finish(seq, SequenceStatus.FINISHED_LENGTH, text, sample, pending)
        else:
            self._emit(seq, text, sample, pending)

    def finish(
        self,
        seq: Sequence,
        status: SequenceStatus,
        text: str,
        sample: TokenSample | None = None,
        decode: int | None = None,
    ) -> None:
        """End a sequence with `status`: out of the scheduler, its last event queued; the request forgotten when
        it was its last running sequence."""
        seq.status = status
        # a turn that ended normally keeps its KV (pinned under its conversation key); see KVCacheManager.finish
        completed = status in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH)
        self.scheduler.remove(seq, completed)
        self._emit(seq, text, sample, decode, seq.finish_reason)
        siblings = self._seqs.get(seq.request_id, [])
        if all(s.finished for s in siblings) and self._seqs.pop(seq.request_id, None) is not None:
            self._sinks.pop(seq.request_id, None)
            with self._lock:
                self._stats.requests_finished += 1

    def _emit(
        self, seq: Sequence, text: str, sample: TokenSample | None, decode: int | None = None, finish: str | None = None
    ) -> None:
        """Queue the sequence's event: `text`, then `decode` decoded, then (finishing) the held-back rest."""
        sink = self._sinks.get(seq.request_id)
        if sink is None:
            return
        # a sequence that ended normally releases held-back text; an aborted or failed one does not
        self.output.put(
            Output(
                seq,
                sink,
                sample,
                text,
                decode,
                flush=finish in ("stop", "length"),
                finish_reason=finish,
                completion_tokens=len(seq.output_token_ids),
                error=seq.error,
                error_kind=seq.error_kind,
                first=len(seq.output_token_ids) == 1,
            )
        )
