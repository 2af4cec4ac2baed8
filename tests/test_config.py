"""Settings from flags and MLX_DROPIN_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ModelSpec, parse_settings


def test_defaults() -> None:
    settings = parse_settings([], {})
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.default_models and not settings.auth_enabled


def test_flags_beat_environment() -> None:
    settings = parse_settings(["--port", "9001"], {"MLX_DROPIN_PORT": "9002", "MLX_DROPIN_HOST": "0.0.0.0"})
    assert settings.port == 9001 and settings.host == "0.0.0.0"


def test_api_keys_from_flag_or_env() -> None:
    assert parse_settings(["--api-key", "a", "--api-key", "b"], {}).api_keys == ("a", "b")
    assert parse_settings([], {"MLX_DROPIN_API_KEYS": "k1, k2"}).api_keys == ("k1", "k2")


def test_model_specs() -> None:
    assert ModelSpec.parse("mlx-community/Qwen3-0.6B-4bit") == ModelSpec(
        "mlx-community/Qwen3-0.6B-4bit", "mlx-community/Qwen3-0.6B-4bit"
    )
    assert ModelSpec.parse("/models/tiny.gguf").id == "tiny"
    assert ModelSpec.parse("mine=/models/dir") == ModelSpec("mine", "/models/dir")
    with pytest.raises(ValueError):
        ModelSpec.parse("=x")


def test_bad_values_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_settings([], {"MLX_DROPIN_PORT": "eighty"})
    with pytest.raises(ValueError):
        parse_settings(["--port", "70000"], {})
    with pytest.raises(ValueError):
        parse_settings(["--no-default-models"], {})
    with pytest.raises(ValueError):
        parse_settings(["--model", "a=/x.gguf", "--model", "a=/y.gguf"], {})


def test_cache_dir_expands_user(tmp_path: Path) -> None:
    assert parse_settings(["--cache-dir", str(tmp_path)], {}).cache_dir == tmp_path
    assert "~" not in str(parse_settings([], {"MLX_DROPIN_CACHE_DIR": "~/x"}).cache_dir)


def test_prefill_chunks_reach_the_scheduler() -> None:
    settings = parse_settings(["--prefill-chunk", "256"], {"MLX_DROPIN_DECODING_PREFILL_CHUNK": "48"})
    scheduler = settings.engine_config().scheduler
    assert (scheduler.prefill_chunk, scheduler.decoding_prefill_chunk) == (256, 48)
    assert parse_settings([], {}).engine_config().scheduler.decoding_prefill_chunk is None  # the device's default
    with pytest.raises(ValueError):
        parse_settings(["--decoding-prefill-chunk", "0"], {})


def test_exact_cpu_layers_from_flag_or_env() -> None:
    assert parse_settings([], {}).exact_cpu_layers is False
    assert parse_settings(["--exact-cpu-layers"], {}).exact_cpu_layers is True
    assert parse_settings([], {"MLX_DROPIN_EXACT_CPU_LAYERS": "1"}).exact_cpu_layers is True
