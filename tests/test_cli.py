"""The `mlx-dropin` command: models list / pull / convert, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from server.models.cache import ModelCache


def test_models_pull_a_default_reuses_the_cache(model_cache: ModelCache, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(model_cache.root), "pull", "all-minilm-l6-v2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == model_cache.entry("all-minilm-l6-v2") and (path / "config.json").is_file()


def test_models_list_shows_entries_and_their_state(model_cache: ModelCache, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(model_cache.root), "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "default" in out and " ok" in out


def test_models_convert_to_a_directory(smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "converted"
    assert main(["models", "convert", str(smollm2_gguf), "--out", str(out)]) == 0
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= \
        {p.name for p in out.iterdir()}


def test_bad_sources_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--cache-dir", str(tmp_path), "convert", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
