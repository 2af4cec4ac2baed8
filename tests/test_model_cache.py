"""The model cache builds an entry once, finds it again, and rebuilds damaged entries instead of loading them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.config import Settings
from server.model_lifecycle import prepare
from server.models.cache import MANIFEST_NAME, ModelCache
from server.models.defaults import MINILM, build_default
from server.models.loading import ModelSourceError, detect_kind, resolve_source
from server.registry import ModelRegistry


def _builder(calls: list[int]):  # type: ignore[no-untyped-def]
    def build(out: Path) -> None:
        calls.append(1)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "weights.bin").write_bytes(b"\x01" * 4096)

    return build


def test_second_build_reuses_the_entry(tmp_path: Path) -> None:
    cache, calls = ModelCache(tmp_path), []
    first = cache.build("m", "test", _builder(calls))
    second = cache.build("m", "test", _builder(calls))
    assert first == second and len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "delete"])
def test_damaged_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cache, calls = ModelCache(tmp_path), []
    entry = cache.build("m", "test", _builder(calls))
    weights = entry / "weights.bin"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        weights.write_bytes(b"\x02" + weights.read_bytes()[1:])
    elif damage == "no-manifest":
        (entry / MANIFEST_NAME).unlink()
    else:
        weights.unlink()
    assert cache.ready("m") is None
    cache.build("m", "test", _builder(calls))
    assert len(calls) == 2 and cache.ready("m") is not None


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)

    def explode(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.build("m", "test", explode)
    assert cache.ready("m") is None
    assert not any(cache.models.iterdir())


def test_partial_temp_dir_from_a_killed_build_is_ignored(tmp_path: Path) -> None:
    cache, calls = ModelCache(tmp_path), []
    (cache.models / "m.tmp-99999").mkdir(parents=True)
    cache.build("m", "test", _builder(calls))
    assert len(calls) == 1


def test_second_start_does_not_fetch_or_convert_again(model_cache: ModelCache, registry: ModelRegistry) -> None:
    # `registry` already prepared the defaults once this session; preparing again must only verify.
    started = time.perf_counter()
    again = ModelRegistry()
    prepare(again, Settings(cache_dir=model_cache.root))
    elapsed = time.perf_counter() - started
    assert {m.id for m in again.list()} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert elapsed < 5, f"second prepare took {elapsed:.1f}s: it should only verify the cache"
    print(f"second prepare: {elapsed:.2f}s")


def test_embedding_default_is_registered_as_embedding(model_cache: ModelCache) -> None:
    path = build_default(MINILM, model_cache)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert detect_kind(path) == "embedding"


def test_hub_repo_resolves_from_a_local_hub_cache(tmp_path: Path) -> None:
    # A hub snapshot laid out exactly as huggingface-hub stores it stands in for the download.
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snapshot / "model.safetensors").write_bytes(b"0")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    path = resolve_source("acme/tiny", ModelCache(tmp_path), offline=True)
    assert path == snapshot and detect_kind(path) == "chat"


def test_missing_hub_repo_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not in the cache"):
        resolve_source("acme/absent", ModelCache(tmp_path), offline=True)


@pytest.mark.parametrize("source", ["/no/such/dir", "./missing.gguf", "not a repo id"])
def test_bad_sources_are_clear_errors(tmp_path: Path, source: str) -> None:
    with pytest.raises(ModelSourceError):
        resolve_source(source, ModelCache(tmp_path), offline=True)
