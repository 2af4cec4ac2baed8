"""The last steps of a server process: no thread may be inside MLX when the interpreter finalizes.

MLX releases the GIL while it loads or evaluates. A daemon thread that is inside such a call when
Python finalizes wants the GIL back on return; CPython then ends that thread with pthread_exit, whose
forced unwinding runs into nanobind's GIL guard, a destructor (noexcept), and the C++ runtime calls
std::terminate: "terminate called without an active exception", SIGABRT, exit status 134, after an
otherwise clean shutdown. On this CPU a SIGTERM while the models load shows it every time (the
loader thread is inside mx.load or mx.eval); on a GPU any engine thread that outlives its join does.

So once hypercorn returned (the lifespan already stopped the engines and batchers, see shutdown.py),
`stop_model_threads` stops whatever a late loader started, and `exit_code` ends the process without
finalization (os._exit, after flushing the logs) when a thread that calls MLX is still running, and
always on a GPU backend: on the H100 (MLX 0.32.4 CUDA) a process whose engine thread was stopped,
joined and its stream synchronized still aborted the same way at finalization. The database is
closed and every generation has ended by then, so nothing is lost that finalization would have
saved. The engine process (engine/core_process.py) ends the same way (`end_process`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from server.model_lifecycle import shutdown
from server.registry import ModelRegistry

log = logging.getLogger(__name__)

# the threads that call into MLX (engine.py, output.py, embeddings/batcher.py, app.py's loader)
MLX_THREAD_NAMES = frozenset({"model-loader", "mlx-engine", "mlx-engine-output", "embedding-batcher"})


def mlx_threads_alive() -> list[str]:
    """Names of the threads that call into MLX and still run."""
    return sorted(t.name for t in threading.enumerate() if t.name in MLX_THREAD_NAMES and t.is_alive())


def stop_model_threads(registry: ModelRegistry, loader: threading.Thread | None) -> list[str]:
    """Stop every engine and batcher (again: a loader that finished after the lifespan ended may have started
    one) unless models are still loading; return the MLX threads still running."""
    if loader is None or not loader.is_alive():
        shutdown(registry)  # idempotent: stopped engines and batchers return at once
    return mlx_threads_alive()


def exit_code(code: int, running: list[str]) -> int:
    """`code` when no MLX thread runs and MLX runs on the CPU; otherwise the process ends here, with `code`,
    skipping finalization."""
    if running:
        log.warning("%s still running at exit: ending the process without interpreter finalization", ", ".join(running))
    elif not on_gpu():
        return code
    end_process(code)
    return code  # not reached


def on_gpu() -> bool:
    """MLX's default device is a GPU (CUDA or Metal)."""
    import mlx.core as mx

    return bool(mx.default_device().type == mx.DeviceType.gpu)


def end_process(code: int) -> None:
    """End the process now with `code`, after flushing the logs and standard streams (no finalization)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
