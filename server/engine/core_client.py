"""The HTTP process's side of the engine-core process: `EngineClient`, the Engine's interface over a pipe.

    submit(request, sink) -> Add over the pipe (the sink kept by request id)
    reader thread         <- Step: each request's events of the step -> its sink, in one call
    the process exits     -> every request in flight ends with an "unavailable" error event (a 503 to its
                             client), `alive` is False (`/ready` answers 503) and a new process starts,
                             loading the model again; requests submitted meanwhile fail the same way

Validation (context length, vocabulary, grammar) runs here, on the caller's thread, against the
limits the engine process reported when it became ready, so a bad request never crosses the pipe.
Stats are the engine's last snapshot (sent every STATS_EVERY seconds).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncGenerator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from server.engine.constraints import ConstraintFactory
from server.engine.core_process import CoreSpec, run
from server.engine.core_protocol import (
    Abort,
    AbortAll,
    Add,
    Ready,
    StartFailed,
    Step,
    Stop,
    ToEngine,
    encoder,
    from_engine,
    request_to_wire,
)
from server.engine.engine import EngineStats
from server.engine.event_buffer import LoopWakers
from server.engine.model_limits import ModelLimits
from server.engine.output import Sink
from server.engine.request import GenerationRequest, TokenEvent, ValidRequest, unavailable_events
from server.engine.request_stream import collect_events, events_of

log = logging.getLogger(__name__)

RESTART_DELAYS = (0.5, 2.0, 10.0, 30.0)  # seconds before the 1st, 2nd, 3rd, later restarts in a row


class EngineStartError(RuntimeError):
    """The engine-core process could not load its model."""


class EngineClient:
    """One chat model's engine in a process of its own, used exactly as an in-process `Engine`."""

    failure: str | None = None  # never set: a lost engine process is restarted, not given up on

    def __init__(self, spec: CoreSpec, tokenizer: Any, start_timeout: float = 1800.0) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.start_timeout = start_timeout
        self.context_length = 0
        self.vocab_size = 0
        self.eos_ids: frozenset[int] = frozenset()
        self._constraints: ConstraintFactory | None = None
        self.limits: ModelLimits | None = None
        self._lock = threading.Lock()  # guards the sinks and `alive` together
        self._send_lock = threading.Lock()
        self._sinks: dict[str, tuple[Sink, set[int]]] = {}  # request id -> sink, its sequences still running
        self._alive = False
        self._stopping = False
        self._stats = EngineStats()
        self.memory: dict[str, float] = {}  # the process's MLX allocator counters, as of its last stats
        self._wakers = LoopWakers()
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process and wait until its model is loaded (EngineStartError if it cannot be)."""
        if self._reader is not None:
            return
        self._spawn()
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(self.start_timeout) or self._start_error is not None:
            self.shutdown()
            raise EngineStartError(self._start_error or "the engine process did not become ready in time")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the process (in-flight sequences end with "abort" first) and the reader."""
        self._stopping = True
        process, conn = self._process, self._conn
        if conn is not None:
            try:
                self._send(AbortAll())
                self._send(Stop())
            except OSError:
                pass
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(timeout)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self._fail_all("the server is shutting down")

    @property
    def alive(self) -> bool:
        """The engine process is up and its model loaded (False while it restarts)."""
        return self._alive

    @property
    def has_work(self) -> bool:
        """Requests are in flight."""
        return bool(self._sinks)

    @property
    def constraints(self) -> ConstraintFactory:
        """Grammars compiled against the model's vocabulary (here: to check requests before they cross)."""
        if self._constraints is None:
            raise RuntimeError("the engine process has not started")
        return self._constraints

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- the Engine's interface ---------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> ValidRequest:
        if isinstance(request, ValidRequest):
            return request
        assert self.limits is not None, "validate needs a started engine"
        return self.limits.check(request)

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        valid = self.validate(request)
        with self._lock:
            if not self._alive:
                unavailable = True
            else:
                unavailable = False
                self._sinks[valid.request_id] = (sink, set(range(valid.params.n)))
        if unavailable:
            sink(unavailable_events(valid.request_id, range(valid.params.n), "the engine process is restarting"))
            return
        try:
            self._send(Add(request_to_wire(valid)))
        except OSError:  # the process just died: the reader fails the request (it is registered)
            pass

    def abort(self, request_id: str) -> None:
        try:
            self._send(Abort(request_id))
        except OSError:
            pass

    def abort_all(self) -> None:
        try:
            self._send(AbortAll())
        except OSError:
            pass

    def stream(self, request: GenerationRequest) -> AsyncGenerator[list[TokenEvent], None]:
        return events_of(request, lambda sink: self.submit(request, sink), self.abort, self._wakers)

    def generate(self, request: GenerationRequest, timeout: float = 600.0) -> list[TokenEvent]:
        return collect_events(request, lambda sink: self.submit(request, sink), timeout)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**vars(self._stats))

    # -- the pipe -----------------------------------------------------------------------------
    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # MLX and threads do not survive a fork
        parent, child = context.Pipe()
        process = context.Process(target=run, args=(child, self.spec), name="mlx-engine-core", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        log.info("engine-core process %d started for %s", process.pid, self.spec.path.name)

    def _send(self, message: ToEngine) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("no engine process")
        data = encoder.encode(message)
        with self._send_lock:
            conn.send_bytes(data)

    def _read(self) -> None:
        failures = 0
        while True:
            conn = self._conn
            assert conn is not None
            try:
                message = from_engine.decode(conn.recv_bytes())
            except (EOFError, OSError):
                conn.close()
                if self._stopping or self.limits is None:  # stopped, or it never became ready (start() says why)
                    if self._start_error is None:
                        self._start_error = "the engine process exited while loading its model"
                    self._ready.set()
                    return
                self._lost()
                time.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])
                failures += 1
                if self._stopping:
                    return
                self._spawn()
                continue
            if isinstance(message, Step):
                self._deliver(message)
            elif isinstance(message, Ready):
                self._became_ready(message)
                failures = 0
            elif isinstance(message, StartFailed):
                log.error("the engine process could not start: %s", message.error)
                if not self._ready.is_set():
                    self._start_error = message.error
                    self._ready.set()

    def _became_ready(self, ready: Ready) -> None:
        if self.limits is None:
            self.context_length, self.vocab_size = ready.context_length, ready.vocab_size
            self.eos_ids = frozenset(ready.eos_ids)
            self._constraints = ConstraintFactory(self.tokenizer, self.vocab_size, self.eos_ids)
            self.limits = ModelLimits(self.context_length, self.vocab_size, self._constraints)
        with self._lock:
            self._stats.blocks_total = ready.blocks_total
            self._alive = True
        self._ready.set()
        log.info("engine-core process %s ready", self.pid)

    def _deliver(self, step: Step) -> None:
        per_request: dict[str, list[TokenEvent]] = {}
        for event in step.events:
            events = per_request.get(event.request_id)
            if events is None:
                per_request[event.request_id] = [event]
            else:
                events.append(event)
        for request_id, events in per_request.items():
            with self._lock:
                entry = self._sinks.get(request_id)
                if entry is None:
                    continue
                sink, running = entry
                for event in events:
                    if event.finish_reason is not None:
                        running.discard(event.index)
                if not running:
                    del self._sinks[request_id]
            try:
                sink(events)
            except Exception:  # the request's event loop is gone
                log.debug("dropping events for %s", request_id, exc_info=True)
        if step.memory is not None:
            self.memory = step.memory
        if step.stats is not None:
            with self._lock:
                for name, value in step.stats.items():
                    setattr(self._stats, name, type(getattr(self._stats, name))(value))

    def _lost(self) -> None:
        """The process died: fail what was in flight, mark the engine down."""
        process = self._process
        code = None
        if process is not None:
            process.join(5)
            code = process.exitcode
        log.error("the engine process %s exited (code %s); restarting it", self.pid, code)
        with self._lock:
            self._alive = False
        self._fail_all(f"the engine process stopped (exit code {code}) and is restarting")

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._alive = False
            sinks, self._sinks = self._sinks, {}
        for request_id, (sink, running) in sinks.items():
            try:
                sink(unavailable_events(request_id, sorted(running), why))
            except Exception:
                log.debug("dropping the failure of %s", request_id, exc_info=True)
