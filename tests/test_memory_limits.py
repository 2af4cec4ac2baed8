"""MLX's memory limits: the arithmetic from device memory and resident bytes, and --mlx-cache-gb reaching MLX."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from server.config import Settings, parse_settings
from server.engine.memory_limits import (
    CACHE_SHARE,
    GIB,
    HEADROOM_FRACTION,
    MIN_HEADROOM,
    derive,
    device_memory,
    plan,
)
from server.model_lifecycle import load
from server.registry import ModelRegistry, ServedModel
from tests.real_vocab import tiny_model_dir


def test_an_h100_with_a_1b_model_and_a_large_pool() -> None:
    device, resident = 80 * GIB, 12 * GIB  # ~2.5 GiB of bf16 weights + a 9.5 GiB KV pool
    limits = derive(device, resident)
    headroom = int(device * HEADROOM_FRACTION)
    assert headroom > MIN_HEADROOM
    assert limits.memory_limit == device - headroom
    assert limits.cache_limit == int((device - headroom - resident) * CACHE_SHARE)
    # resident + the transient arrays the cache leaves room for + the cache stay under the limit
    assert resident + limits.cache_limit < limits.memory_limit < device
    assert 14 * GIB < limits.cache_limit < 16 * GIB


def test_a_small_device_keeps_the_minimum_headroom() -> None:
    limits = derive(8 * GIB, 3 * GIB)
    assert limits.memory_limit == 6 * GIB  # 8 % of 8 GiB is under MIN_HEADROOM
    assert limits.cache_limit == int(3 * GIB * CACHE_SHARE)


def test_the_flag_overrides_the_cache_limit_but_not_past_what_is_spare() -> None:
    assert derive(80 * GIB, 12 * GIB, cache_bytes=2 * GIB).cache_limit == 2 * GIB
    limits = derive(16 * GIB, 13 * GIB, cache_bytes=4 * GIB)
    assert limits.cache_limit == limits.memory_limit - 13 * GIB == 1 * GIB


def test_a_pool_larger_than_the_device_leaves_no_cache() -> None:
    limits = derive(16 * GIB, 20 * GIB)
    assert limits.cache_limit == 0 and limits.memory_limit == 14 * GIB


def test_device_memory_from_cuda_metal_and_cpu_device_info() -> None:
    assert device_memory({"device_name": "NVIDIA H100", "total_memory": 85 * 10**9, "free_memory": 1}) == 85 * 10**9
    assert device_memory({"memory_size": 64 * GIB, "max_recommended_working_set_size": 48 * GIB}) == 64 * GIB
    assert device_memory({"architecture": "x86_64", "device_name": "Intel(R) Xeon(R)"}) is None


def test_the_plan_for_a_cuda_and_a_metal_device() -> None:
    cuda = {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90", "total_memory": 85_520_809_984}
    limits = plan(cuda, 12 * GIB, None, metal=False)
    assert limits == derive(85_520_809_984, 12 * GIB) and limits.wired is None
    assert plan(cuda, 12 * GIB, 3.0, metal=False).cache_limit == 3 * GIB
    mac = {"memory_size": 64 * GIB, "max_recommended_working_set_size": 48 * GIB}
    assert plan(mac, 20 * GIB, None, metal=True).wired == 20 * GIB
    assert plan(mac, 60 * GIB, None, metal=True).wired == 48 * GIB  # at most the recommended working set
    assert plan({"device_name": "no size"}, GIB, None, metal=False) is None


def test_the_flag_and_its_environment_variable_parse() -> None:
    assert parse_settings([], {}).mlx_cache_gb is None
    assert parse_settings(["--mlx-cache-gb", "1.5"], {}).mlx_cache_gb == 1.5
    assert parse_settings([], {"MLX_DROPIN_MLX_CACHE_GB": "0.5"}).mlx_cache_gb == 0.5
    with pytest.raises(ValueError):
        parse_settings(["--mlx-cache-gb", "-1"], {})


def test_the_flag_reaches_mlx_when_the_models_load(tmp_path: Path) -> None:
    path = tiny_model_dir(
        tmp_path / "tiny", vocab="gpt-2", template="mistralai-Mistral-Nemo-Instruct-2407", model_type="llama"
    )
    registry = ModelRegistry()
    registry.add(ServedModel(id="tiny", kind="chat", path=path))
    settings = Settings(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data", kv_cache_gb=0.01, mlx_cache_gb=0.25)
    before = mx.set_cache_limit(0)  # what the process had; put back below
    try:
        load(registry, settings)
        assert mx.set_cache_limit(before) == GIB // 4  # the limit load() set (the CPU backend: the flag only)
    finally:
        mx.set_cache_limit(before)
        for served in registry.list():
            if served.engine is not None:
                served.engine.shutdown()
