"""The batch engine: one thread owns all MLX work; the asyncio side submits and streams through it.

    HTTP (asyncio)                         engine thread
    submit(request, sink) --inbox-->  drain -> Scheduler.schedule()
                                            -> ModelRunner.prefill, DecodeStepper.step (decode
                                               + sampling, see decode_step.py)
                                            -> accept tokens, finish sequences (in_flight.py); KVCacheManager.sync
                                               writes rows back, hashes blocks, pins finished turns
    sink([TokenEvent]) <------------------ OutputProcessor: detokenize, one event per token per
    (EventBuffer: woken once, read all)        sequence, one sink call per request per step (its own
                                               thread on a GPU, see output.py)

Requests are validated once, on the caller's thread (`validate`, or `submit` for a request nobody
checked), so a bad one fails fast with InvalidRequestError and never reaches the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from server.engine.block_pool import BlockPool
from server.engine.config import EngineConfig, resolved_config
from server.engine.constraints import ConstraintFactory
from server.engine.decode_step import DecodeStepper
from server.engine.detokenizer import IdsToText
from server.engine.event_buffer import LoopWakers
from server.engine.in_flight import RequestsInFlight
from server.engine.kv_manager import WRITE_BACK_EVERY, KVCacheManager
from server.engine.mirrored_runner import MirroredRunner, open_followers
from server.engine.model_limits import (
    ModelLimits,
    model_context_length,
    model_vocab_size,
)
from server.engine.output import OutputProcessor, Sink
from server.engine.paged_cache import KVStore
from server.engine.prefill_buckets import buckets_on, keep_enough_attention_graphs, template_prefix, warm_shapes
from server.engine.request import GenerationRequest, TokenEvent, ValidRequest, unavailable_events
from server.engine.request_stream import (
    collect_events,
    events_of,
)
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.sequence import SequenceStatus
from server.engine.step_channel import StepChannel

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters for the metrics endpoint."""

    blocks_total: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    blocks_cached: int = 0
    blocks_pinned: int = 0
    running: int = 0
    waiting: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    steps: int = 0
    decode_tokens_per_s: float = 0.0
    max_decode_batch: int = 0
    decode_steps_ahead: int = 0  # decode steps whose forward was launched a step early (overlapped)
    requests_submitted: int = 0  # accepted by submit()
    requests_finished: int = 0  # every sequence ended (done, aborted or failed); equal to submitted when idle
    prefill_shapes_built: int = 0  # prefill bucket shapes first run while serving, not at start-up (CUDA: built)


@dataclass
class _Add:
    request: ValidRequest
    sink: Sink


@dataclass
class _Abort:
    request_id: str


class _AbortAll:
    pass


class Engine:
    """Continuous batching over a paged KV pool for one model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None = None,
        context_length: int | None = None,
        channel: StepChannel | None = None,
    ) -> None:
        """With `channel`, this is rank 0 of a world whose other ranks follow every forward (mirrored_runner.py)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = resolved_config(config or EngineConfig(), on_gpu=mx.default_device().type == mx.DeviceType.gpu)
        if channel is not None:
            open_followers(channel)  # they probe the model with this rank, then size their stores as it says
        self.store = KVStore.for_model(model, self.config.block_size, self.config.kv_cache_gb, self.config.num_blocks)
        shape, num_blocks, bs = self.store.shape, self.store.num_blocks, self.config.block_size
        self.pool = BlockPool(num_blocks, bs)
        buckets = buckets_on(self.config)
        self.runner = (
            ModelRunner(model, self.store, buckets)
            if channel is None
            else MirroredRunner(model, self.store, channel, buckets)
        )
        self.failure: str | None = None  # why the engine stopped for good (a rank of its world was lost)
        self._step_started: float | None = None  # while a step runs (a split model's watchdog reads it)
        self.kv = KVCacheManager(self.pool, self.runner, WRITE_BACK_EVERY)
        self.scheduler = Scheduler(self.kv, self.config.scheduler)
        self.context_length = context_length or model_context_length(model)
        self.vocab_size = model_vocab_size(model, tokenizer)
        self.ids_to_text = IdsToText(tokenizer)
        self.eos_ids = frozenset(
            getattr(tokenizer, "eos_token_ids", None)
            or ([tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else [])
        )
        # grammar-constrained decoding (response_format); llguidance's tokenizer is built on first use
        self.constraints = ConstraintFactory(tokenizer, self.vocab_size, self.eos_ids)
        self.limits = ModelLimits(self.context_length, self.vocab_size, self.constraints)
        self._inbox: queue.Queue[_Add | _Abort | _AbortAll | None] = queue.Queue()
        self._stats = EngineStats(blocks_total=num_blocks)
        self._decode_window: list[tuple[float, int]] = []
        self._thread: threading.Thread | None = None
        on_gpu = mx.default_device() != mx.cpu
        self.stepper = DecodeStepper(
            self.runner,
            self.scheduler,
            self.kv,
            self.context_length,
            self.config.decode_ahead if self.config.decode_ahead is not None else on_gpu,
        )
        self.output = OutputProcessor(
            threaded=self.config.output_thread if self.config.output_thread is not None else on_gpu
        )
        self._lock = threading.Lock()
        self._wakers = LoopWakers()
        self.requests = RequestsInFlight(
            self.scheduler,
            self.output,
            self.constraints,
            self.ids_to_text,
            self.eos_ids,
            self.context_length,
            self._stats,
            self._lock,
        )
        self._record_state()  # the pool's counts from the start, not only after the first step
        log.info(
            "KV pool: %d blocks x %d tokens (%.2f GiB, %d bytes/token)",
            num_blocks,
            bs,
            self.store.nbytes / (1 << 30),
            shape.bytes_per_token,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; with prefill buckets, return once it has run every fresh bucket shape."""
        if self._thread is None:
            if self.runner.prefill_buckets:
                keep_enough_attention_graphs()
            warmed = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(warmed,), name="mlx-engine", daemon=True)
            self._thread.start()
            warmed.wait()
            if isinstance(self.runner, MirroredRunner):
                threading.Thread(target=self._watch_ranks, name="engine-rank-watch", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what runs, stop the engine thread, then the output thread (in that order: the engine's last
        events go through the output thread). A thread that does not stop in `timeout` is logged."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the engine thread did not stop within %gs", timeout)
            self._thread = None
        self.output.close(timeout)

    # -- the public interface -----------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> ValidRequest:
        """Check a request against the model's limits (InvalidRequestError if it does not fit); the checked request
        is what `submit` trusts without checking again."""
        if isinstance(request, ValidRequest):
            return request
        return self.limits.check(request)

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (checked here unless `validate` made it); `sink` receives its TokenEvents in order, on
        the engine's thread or its output thread."""
        valid = self.validate(request)
        if self.failure is not None:
            sink(unavailable_events(valid.request_id, range(valid.params.n), self.failure))
            return
        with self._lock:
            self._stats.requests_submitted += 1
        self._inbox.put(_Add(valid, sink))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at the next step."""
        self._inbox.put(_Abort(request_id))

    def abort_all(self) -> None:
        """Cancel every request (a graceful shutdown's deadline); each sequence ends with finish_reason "abort"."""
        self._inbox.put(_AbortAll())

    def stream(self, request: GenerationRequest) -> AsyncGenerator[list[TokenEvent], None]:
        """Submit and yield the request's events, every pending one at once, until every sequence finished;
        abort on exit."""
        return events_of(request, lambda sink: self.submit(request, sink), self.abort, self._wakers)

    def generate(self, request: GenerationRequest, timeout: float = 600.0) -> list[TokenEvent]:
        """Blocking helper for scripts and tests: every event of the request."""
        return collect_events(request, lambda sink: self.submit(request, sink), timeout)

    @property
    def has_work(self) -> bool:
        """Sequences wait or run."""
        return self.scheduler.has_work

    @property
    def alive(self) -> bool:
        """True unless the engine stopped for good (`failure`: a rank of its world was lost); an in-process
        engine has no process to lose (see core_client.py)."""
        return self.failure is None

    def stats(self) -> EngineStats:
        with self._lock:
            stats = EngineStats(**vars(self._stats))
        stats.decode_steps_ahead = self.stepper.steps_ahead
        stats.prefill_shapes_built = self.runner.shapes_built_serving
        now = time.monotonic()
        window = [(t, n) for t, n in self._decode_window if now - t < 10]
        if window:
            span = max(now - window[0][0], 1e-3)
            stats.decode_tokens_per_s = sum(n for _, n in window) / span
        return stats

    def check_integrity(self) -> None:
        """Pool invariants; call when idle (tests)."""
        self.kv.check_integrity()

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self, warmed: threading.Event) -> None:
        stream = mx.new_stream(mx.default_device())
        try:
            with mx.stream(stream):
                self._warm_prefill()
                warmed.set()
                while True:
                    running = self._drain(block=not self.scheduler.has_work)
                    if running and self.scheduler.has_work:
                        self._step()
                    else:
                        self._record_state()  # what the commands changed (aborts free blocks without a step)
                    self.output.flush()
                    if not running or self.failure is not None:
                        break
                if isinstance(self.runner, MirroredRunner) and self.failure is None:
                    try:
                        self.runner.stop_followers()
                    except RuntimeError as exc:  # a rank already gone: nothing to stop there
                        log.warning("could not stop the other ranks: %s", exc)
        finally:
            warmed.set()
            # nothing of this thread's left on the device once it ends: the step launched ahead is dropped and
            # the stream drained, so the stream's teardown at thread exit has no work to wait for
            self.stepper.drop()
            try:
                mx.synchronize(stream)
            except Exception:  # a device fault already failed the steps; the thread still ends cleanly
                log.exception("synchronizing the engine stream at shutdown failed")

    def _warm_prefill(self) -> None:
        """Run every bucket shape a burst of fresh prompts can take, on this thread (MLX keeps cuDNN's graphs
        per thread); a failure is logged and the engine serves anyway."""
        if not self.runner.prefill_buckets:
            return
        scheduler = self.config.scheduler
        prefix = template_prefix(self.tokenizer)
        shapes = warm_shapes(scheduler.max_num_seqs, scheduler.prefill_chunk or 1, prefix, self.config.block_size)
        started = time.perf_counter()
        try:
            self.runner.warm_prefill(shapes)
        except Exception:
            log.exception("running the prefill bucket shapes at start-up failed; they are built on first use")
            return
        log.info(
            "ran %d prefill bucket shapes in %.1fs (chat template prefix: %d tokens)",
            len(shapes),
            time.perf_counter() - started,
            prefix,
        )

    def _drain(self, block: bool) -> bool:
        while True:
            try:
                command = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if command is None:
                self.requests.abort_everything()
                return False
            if isinstance(command, _Add):
                try:
                    self.requests.add(command.request, command.sink)
                except Exception as exc:  # a request that cannot start must not take the engine thread down
                    self.requests.reject(command.request, command.sink, exc)
            elif isinstance(command, _AbortAll):
                self.requests.abort_everything()
            else:
                self.requests.abort(command.request_id, SequenceStatus.FINISHED_ABORTED)

    def _step(self) -> None:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        for seq in plan.failed:
            self.requests.finish(seq, SequenceStatus.FINISHED_ERROR, "")
        try:
            self._step_started = time.monotonic()
            self._run(plan)
        except Exception as exc:  # a failing forward must not take the engine down
            if isinstance(self.runner, MirroredRunner):
                self._lose_world(exc)
                return
            log.exception("engine step failed")
            self.stepper.drop()
            self.kv.abandon_unwritten()  # finished sequences whose KV may be incomplete: freed, not pinned
            for seq in [s for s, _ in plan.prefills] + plan.decodes:
                if not seq.finished:
                    seq.error = f"generation failed: {exc}"
                    seq.error_kind = "internal"
                    self.requests.finish(seq, SequenceStatus.FINISHED_ERROR, "")
        finally:
            self._step_started = None
        self._record_state(step=True)
        self.output.flush()  # the step's events leave together
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step: prefill %d tokens over %d sequences, decode %d, %d waiting, %.1f ms",
                sum(n for _, n in plan.prefills),
                len(plan.prefills),
                len(plan.decodes),
                len(self.scheduler.waiting),
                1e3 * (time.perf_counter() - started),
            )

    def _watch_ranks(self) -> None:
        """A split model's watchdog: a step stuck longer than `rank_timeout_s` waits on a rank that hangs (the
        engine thread is blocked inside a collective and cannot notice): its requests end with an "unavailable"
        error and the engine stops for good. The blocked thread itself cannot be freed; shutdown leaves it."""
        while self._thread is not None and self.failure is None:
            time.sleep(min(1.0, self.config.rank_timeout_s / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > self.config.rank_timeout_s:
                self.failure = f"a rank of this model's world did not answer for {self.config.rank_timeout_s:g}s"
                log.error("engine stopped: %s", self.failure)
                self.requests.fail_everything(self.failure)  # the engine thread, blocked in the step, touches none
                self.output.flush()

    def _lose_world(self, exc: BaseException) -> None:
        """A step failed on rank 0 of a world: the ranks are out of step (or one is gone), so nothing can run any
        more. Every request ends with an "unavailable" error (a 503); later ones are refused the same way."""
        self.failure = f"a rank of this model's world is gone or out of step: {exc}"
        log.error("engine stopped: %s", self.failure)
        self.stepper.drop()
        self.requests.fail_everything(self.failure)
        self._record_state(step=True)
        self.output.flush()

    def _record_state(self, step: bool = False) -> None:
        """Publish pool and queue counts to stats() (one consistent snapshot, taken on the engine thread)."""
        with self._lock:
            s = self._stats
            s.steps += step
            s.blocks_used, s.blocks_free = self.pool.num_used, self.pool.num_free
            s.blocks_cached, s.blocks_pinned = self.pool.num_cached_free, self.kv.num_pinned_blocks
            s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)

    def _run(self, plan: StepPlan) -> None:
        batched = [(s, n) for s, n in plan.prefills if s.params.prompt_logprobs is None]
        self.runner.prefill_rows(batched)
        for seq, num_tokens in plan.prefills:
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None:  # needs its chunk's logits: runs alone
                found = self.runner.prefill(seq, num_tokens)
                seq.prompt_logprobs[start : start + len(found)] = found
            seq.num_computed_tokens += num_tokens
            self._stats.prompt_tokens_computed += num_tokens
            self.kv.commit(seq)
        if not plan.decodes:
            return
        fresh = [s for s in plan.decodes if not s.output_token_ids]
        self._stats.prompt_tokens_computed += len(fresh)  # a prompt's last token is fed by its first decode
        self._stats.prompt_tokens_reused += sum(s.num_cached_tokens for s in fresh)
        samples = self.stepper.step(plan.decodes)
        self._decode_window.append((time.monotonic(), len(plan.decodes)))
        self._stats.max_decode_batch = max(self._stats.max_decode_batch, len(plan.decodes))
        if len(self._decode_window) > 512:
            del self._decode_window[:256]
        for seq, sample in zip(plan.decodes, samples):
            seq.num_computed_tokens += 1
            self.requests.accept(seq, sample)
        self.kv.sync(plan.decodes)  # decode rows written back, full blocks hashed, finished turns pinned


__all__ = ["Engine", "EngineConfig", "EngineStats"]
