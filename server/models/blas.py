"""The CPU fast path: load OpenBLAS before MLX so MLX's matrix products use it.

MLX's Linux CPU wheel resolves its cblas symbols from a bundled reference BLAS
that is about 50x slower than OpenBLAS. Loading ``libopenblas.so.0`` with
RTLD_GLOBAL before the first ``import mlx.core`` makes those symbols resolve
to OpenBLAS instead. Nothing else may import mlx.core first: ``server``'s
package import calls :func:`load_fast_blas`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "/opt/homebrew/opt/openblas/lib/libopenblas.so.0",
)

_loaded: list[str] = []  # the one path loaded this process (a process fact, not app state)


def find_openblas() -> str | None:
    """The OpenBLAS shared library to load, or None. MLX_DROPIN_OPENBLAS overrides the search."""
    override = os.environ.get("MLX_DROPIN_OPENBLAS")
    if override:
        return override if override != "none" else None
    for candidate in _CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    found = ctypes.util.find_library("openblas")
    return found


def load_fast_blas() -> str | None:
    """Load OpenBLAS globally on Linux if present; return the path loaded (None on macOS or if absent)."""
    if _loaded:
        return _loaded[0]
    if not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:
        log.warning("mlx.core was imported before OpenBLAS could be loaded; CPU matmul stays slow")
        return None
    path = find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load %s: %s", path, exc)
        return None
    _loaded.append(path)
    return path


def describe_blas() -> str:
    """One line for the start-up log: which BLAS MLX's CPU backend uses."""
    if not sys.platform.startswith("linux"):
        return "Accelerate/Metal (macOS)"
    if _loaded:
        return f"OpenBLAS ({_loaded[0]})"
    return "MLX's bundled reference BLAS (slow: install libopenblas0-pthread for ~50x faster CPU matmul)"
