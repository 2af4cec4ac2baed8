"""bench/ scripts find the model cache as the server does: --cache-dir, then MLX_DROPIN_CACHE_DIR, then default."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

from server.models.cache import ModelCache, default_cache_root, write_manifest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/ on sys.path, as it is for a script run from there."""
    monkeypatch.syspath_prepend(str(BENCH))


def _ready_entry(root: Path, key: str) -> Path:
    """A complete cache entry for `key` under `root` (a manifest over one small file)."""
    entry = ModelCache(root).entry(key)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    write_manifest(entry, "test")
    return entry


def test_the_helper_resolves_like_the_server(
    bench_modules: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_location = importlib.import_module("cache_location")
    parser = argparse.ArgumentParser()
    cache_location.add_cache_dir_argument(parser)
    monkeypatch.delenv("MLX_DROPIN_CACHE_DIR", raising=False)
    assert cache_location.cache_dir(parser.parse_args([])) == default_cache_root()
    monkeypatch.setenv("MLX_DROPIN_CACHE_DIR", str(tmp_path / "from-env"))
    assert cache_location.cache_dir(parser.parse_args([])) == tmp_path / "from-env"
    assert cache_location.cache_dir(parser.parse_args(["--cache-dir", str(tmp_path / "flag")])) == tmp_path / "flag"
    entry = _ready_entry(tmp_path / "from-env", "smollm2-135m-instruct")
    assert cache_location.default_model_dir("smollm2-135m-instruct", tmp_path / "from-env") == entry
    with pytest.raises(ValueError):
        cache_location.default_model_dir("not-a-default", tmp_path)


def test_engine_benchmark_reads_the_cache_the_environment_names(
    bench_modules: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _ready_entry(tmp_path, "smollm2-135m-instruct")
    monkeypatch.setenv("MLX_DROPIN_CACHE_DIR", str(tmp_path))
    sys.modules.pop("engine_vs_mlxlm", None)
    bench = importlib.import_module("engine_vs_mlxlm")
    assert bench.default_model_dir(argparse.Namespace(cache_dir=None)) == entry
    other = _ready_entry(tmp_path / "flag", "smollm2-135m-instruct")
    assert bench.default_model_dir(argparse.Namespace(cache_dir=str(tmp_path / "flag"))) == other
