"""The engine-core process: one chat model's weights, KV pool and step loop, away from the HTTP process's GIL.

The HTTP process starts it (`EngineClient`, core_client.py) with a `CoreSpec`. Here the model
loads, the `Engine` runs its thread as in-process, and the pipe is served both ways:

    main thread            pipe -> Add / Abort / AbortAll / Stop -> Engine.submit / abort / abort_all
    the delivering thread  (the engine's, or its output thread) each step's events, every request's,
                           -> one Step message -> pipe (Outbox); a stats thread sends stats while idle

If the HTTP process goes (the pipe closes), everything stops: no generation outlives its clients.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import NoReturn

from server.engine.config import EngineConfig
from server.engine.core_protocol import (
    STATS_EVERY,
    Abort,
    AbortAll,
    Add,
    Ready,
    StartFailed,
    Step,
    encoder,
    request_from_wire,
    stats_to_wire,
    to_engine,
)
from server.engine.engine import Engine
from server.engine.memory_limits import apply_memory_limits, mlx_memory
from server.engine.request import TokenEvent
from server.gc_heap import freeze_start_up_heap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSpec:
    """What the engine-core process needs to start: the model directory and how to run it."""

    path: Path
    dtype: str
    engine_config: EngineConfig
    exact_cpu_layers: bool
    log_level: str = "info"
    mlx_cache_gb: float | None = None  # --mlx-cache-gb (None: derived on a GPU; see memory_limits.py)


class Outbox:
    """Events on their way to the HTTP process: every sink appends here; after each step the whole batch leaves
    as one Step message, sent by the thread that delivered the step. The engine's stats go along at most every
    STATS_EVERY seconds, and on their own while the engine is idle (`run_stats`)."""

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self._conn = conn
        self._engine = engine
        self._events: list[TokenEvent] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._stats_at = 0.0

    def put(self, events: list[TokenEvent]) -> None:
        """A request's events of this step (a sink: the engine's thread or its output thread)."""
        with self._lock:
            self._events.extend(events)

    def flush(self) -> None:
        """The step's events are all in: send them."""
        with self._lock:
            events, self._events = self._events, []
            if events:
                self._send(events)

    def close(self) -> None:
        self.flush()
        self._closed.set()

    def run_stats(self) -> None:
        """A thread's loop: stats while no step sends them (idle engines change too: aborts free blocks)."""
        while not self._closed.wait(STATS_EVERY):
            with self._lock:
                if time.monotonic() - self._stats_at >= STATS_EVERY:
                    self._send([])

    def _send(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        stats = memory = None
        if now - self._stats_at >= STATS_EVERY:
            stats, memory, self._stats_at = stats_to_wire(self._engine.stats()), mlx_memory(), now
        try:
            self._conn.send_bytes(encoder.encode(Step(events, stats, memory)))
        except OSError:  # the HTTP process is gone; the main thread sees the pipe close and stops
            pass


def run(conn: Connection, spec: CoreSpec) -> None:
    """The process's entry point: load, report Ready (or StartFailed), then serve the pipe until Stop or EOF.

    However it goes, the process ends here without the interpreter's finalization: nothing needs it, and
    MLX's CUDA build can abort in it even after an orderly stop ("terminate called without an active
    exception", see server/exit_order.py). Once the HTTP process is gone, this one ends too, even while
    it is still loading (`_watch_parent`)."""
    logging.basicConfig(
        level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [engine-core] %(message)s"
    )
    _watch_parent()
    try:
        engine = _start(spec)
    except Exception as exc:  # reported to the HTTP process, which fails its start-up with it
        log.exception("the engine-core process could not start")
        try:
            conn.send_bytes(encoder.encode(StartFailed(f"{type(exc).__name__}: {exc}")))
        except OSError:  # nobody is left to tell
            pass
        _end(1)
    freeze_start_up_heap(f"engine process for {spec.path.name}")
    outbox = Outbox(conn, engine)
    engine.output.on_batch = outbox.flush
    stats = threading.Thread(target=outbox.run_stats, name="engine-core-stats", daemon=True)
    stats.start()
    engine.start()
    try:
        ready = Ready(engine.context_length, engine.vocab_size, sorted(engine.eos_ids), engine.pool.num_blocks)
        conn.send_bytes(encoder.encode(ready))
        _serve(conn, engine, outbox)
    except OSError:  # the HTTP process went while this one loaded: a broken pipe, not a hang at exit
        log.warning("the server process is gone: the engine process stops")
    finally:
        engine.shutdown()  # in-flight sequences end with "abort"; their events still leave
        outbox.close()
        stats.join(10)
    _end(0)


def _end(code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _watch_parent() -> None:
    """End this process as soon as the HTTP process that started it is gone (killed, crashed), at any stage:
    loading a large model takes minutes, and its pipe is read only once it is loaded."""
    parent = multiprocessing.parent_process()
    if parent is None:  # run() called directly, not as a spawned process
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        log.warning("the server process is gone: the engine process ends")
        _end(0)

    threading.Thread(target=watch, name="engine-core-parent", daemon=True).start()


def _start(spec: CoreSpec) -> Engine:
    from server.models.loading import load_chat_model

    model, tokenizer = load_chat_model(spec.path, spec.dtype)
    if not spec.exact_cpu_layers:
        from server.models.cpu_layers import speed_up_for_cpu

        speed_up_for_cpu(model)
    engine = Engine(model, tokenizer, spec.engine_config)
    apply_memory_limits(spec.mlx_cache_gb)  # weights and the KV pool are resident now
    return engine


def _serve(conn: Connection, engine: Engine, outbox: Outbox) -> None:
    while True:
        try:
            message = to_engine.decode(conn.recv_bytes())
        except (EOFError, OSError):  # the HTTP process is gone: stop everything
            return
        if isinstance(message, Add):
            engine.submit(request_from_wire(message.request), outbox.put)
        elif isinstance(message, Abort):
            engine.abort(message.request_id)
        elif isinstance(message, AbortAll):
            engine.abort_all()
        else:  # Stop
            return
