"""The last steps of a server process: no thread may be inside MLX when the interpreter finalizes.

MLX releases the GIL while it loads or evaluates. A daemon thread that is inside such a call when
Python finalizes wants the GIL back on return; CPython then ends that thread with pthread_exit, whose
forced unwinding runs into nanobind's GIL guard, a destructor (noexcept), and the C++ runtime calls
std::terminate: "terminate called without an active exception", SIGABRT, exit status 134, after an
otherwise clean shutdown. On this CPU a SIGTERM while the models load shows it every time (the
loader thread is inside mx.load or mx.eval); on a GPU any engine thread that outlives its join does.

So once hypercorn returned (the lifespan already stopped the engines and batchers, see shutdown.py),
`stop_model_threads` stops whatever a late loader started, and `exit_code` ends the process without
finalization (os._exit, after flushing the logs) when a thread that calls MLX is still running: the
database is closed and every generation has ended by then, so nothing is lost that finalization
would have saved.
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
    """`code` when no MLX thread runs; otherwise the process ends here, with `code`, skipping finalization."""
    if not running:
        return code
    log.warning("%s still running at exit: ending the process without interpreter finalization", ", ".join(running))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
