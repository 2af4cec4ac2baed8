"""Where the benchmarks find the model cache: the server's own rule, shared by every bench script.

`--cache-dir`, else MLX_DROPIN_CACHE_DIR, else ~/.cache/mlx-dropin (server.config.resolve_cache_dir,
what `mlx-dropin models` uses), and the default models are fetched or converted into it the way the
server does on first start when they are not there yet. Scripts put the repository root on sys.path
before importing this.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from server.config import resolve_cache_dir

HELP = "model cache (default: MLX_DROPIN_CACHE_DIR, else ~/.cache/mlx-dropin)"


def add_cache_dir_argument(parser: argparse.ArgumentParser) -> None:
    """The `--cache-dir DIR` flag every bench script takes."""
    parser.add_argument("--cache-dir", default=None, help=HELP)


def cache_dir(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Path:
    """The cache a run uses: its --cache-dir flag, then MLX_DROPIN_CACHE_DIR, then the default."""
    return resolve_cache_dir(getattr(args, "cache_dir", None), environ)


def default_model_dir(model_id: str, root: Path) -> Path:
    """The prepared directory of a default model (`smollm2-135m-instruct`, ...) in the cache at `root`."""
    from server.models.cache import ModelCache
    from server.models.defaults import DEFAULTS, build_default

    for default in DEFAULTS:
        if default.id == model_id:
            return build_default(default, ModelCache(root))
    raise ValueError(f"{model_id!r} is not a default model: {', '.join(d.id for d in DEFAULTS)}")
