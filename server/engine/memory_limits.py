"""MLX's memory limits on a GPU, set from the device's memory and what the loaded models keep resident.

MLX keeps freed buffers in a cache for reuse. Its CUDA allocator lets that cache grow to 95 % of the
device (the same figure as its memory limit), and counts neither the CUDA context, nor cuBLAS/cuDNN
workspaces, nor CUDA graphs, nor the stream-ordered memory pool's own reserve. The KV pools are
allocated once, so what can grow during serving is the cache of transient arrays (activations,
gathered KV, logits of every batch shape seen) until it meets what MLX does not count: the likely cause
of the `cudaMallocAsync ... out of memory` seen at 128 streams on the H100 (read from MLX's source, not
yet confirmed there; bench/memory_soak.py checks that memory stays flat). So, once the models are loaded
(weights and KV pools resident):

    memory limit = device memory - headroom       headroom = max(HEADROOM_FRACTION x device, MIN_HEADROOM)
    spare        = memory limit - resident        resident = MLX's active memory after loading
    cache limit  = spare x CACHE_SHARE            (or --mlx-cache-gb)

so resident + a step's transient arrays (up to the rest of `spare`) + the cache stay under the limit.
On the CPU backend MLX keeps its defaults (the host's memory is the system's business) unless
--mlx-cache-gb is given. On Metal the resident bytes are also wired (mx.set_wired_limit), up to the
device's recommended working set. `derive` and `plan` are the arithmetic (pure, tested);
`apply_memory_limits` reads the device and MLX's active memory and sets the limits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx

log = logging.getLogger(__name__)

GIB = 1 << 30
HEADROOM_FRACTION = 0.08  # of the device: what MLX does not count (context, library workspaces, graphs, pool reserve)
MIN_HEADROOM = 2 * GIB
CACHE_SHARE = 0.25  # of the spare memory: the rest is for the transient arrays of the step in flight


@dataclass(frozen=True)
class MemoryLimits:
    """What to hand MLX (bytes); `wired` is None where wiring does not apply (anything but Metal)."""

    device_bytes: int
    resident_bytes: int
    memory_limit: int
    cache_limit: int
    wired: int | None = None


def derive(device_bytes: int, resident_bytes: int, cache_bytes: int | None = None) -> MemoryLimits:
    """The limits for a device of `device_bytes` with `resident_bytes` loaded; `cache_bytes` overrides the derived
    cache limit (it is still capped by what is spare)."""
    headroom = max(int(device_bytes * HEADROOM_FRACTION), MIN_HEADROOM)
    memory_limit = max(device_bytes - headroom, 0)
    spare = max(memory_limit - resident_bytes, 0)
    cache = int(spare * CACHE_SHARE) if cache_bytes is None else min(cache_bytes, spare)
    return MemoryLimits(device_bytes, resident_bytes, memory_limit, cache)


def device_memory(info: dict[str, Any]) -> int | None:
    """The device's memory in bytes from mx.device_info(): `total_memory` (CUDA) or `memory_size` (Metal)."""
    for key in ("total_memory", "memory_size"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_info() -> dict[str, Any]:
    if hasattr(mx, "device_info"):
        return dict(mx.device_info())
    return dict(mx.metal.device_info()) if mx.metal.is_available() else {}


def plan(info: dict[str, Any], resident_bytes: int, cache_gb: float | None, metal: bool) -> MemoryLimits | None:
    """The limits for a GPU whose mx.device_info() is `info` (None when it reports no memory size); on Metal
    (`metal`) the resident bytes are wired too, up to the recommended working set."""
    total = device_memory(info)
    if total is None:
        return None
    limits = derive(total, resident_bytes, None if cache_gb is None else int(cache_gb * GIB))
    recommended = info.get("max_recommended_working_set_size")
    if metal and isinstance(recommended, int):
        limits = replace(limits, wired=min(resident_bytes, recommended))
    return limits


def apply_memory_limits(cache_gb: float | None) -> MemoryLimits | None:
    """Set MLX's limits for the models loaded so far (call once they are); None where MLX keeps its defaults."""
    if mx.default_device().type != mx.DeviceType.gpu:
        if cache_gb is not None:
            mx.set_cache_limit(int(cache_gb * GIB))
            log.info("MLX cache limit: %.2f GiB (--mlx-cache-gb; CPU backend)", cache_gb)
        return None
    info = _device_info()
    limits = plan(info, mx.get_active_memory(), cache_gb, mx.metal.is_available())
    if limits is None:
        log.warning("MLX memory limits left at their defaults: the device reports no memory size (%s)", info)
        return None
    if limits.memory_limit <= limits.resident_bytes:
        log.warning(
            "weights and KV pools (%.2f GiB) leave no room under the memory limit (%.2f GiB of %.2f GiB): "
            "lower --kv-cache-gb",
            limits.resident_bytes / GIB,
            limits.memory_limit / GIB,
            limits.device_bytes / GIB,
        )
    mx.set_memory_limit(limits.memory_limit)
    mx.set_cache_limit(limits.cache_limit)
    if limits.wired is not None:
        mx.set_wired_limit(limits.wired)
    log.info(
        "MLX memory: device %.2f GiB, resident %.2f GiB (weights + KV pools), limit %.2f GiB, cache limit %.2f GiB%s",
        limits.device_bytes / GIB,
        limits.resident_bytes / GIB,
        limits.memory_limit / GIB,
        limits.cache_limit / GIB,
        " (--mlx-cache-gb)" if cache_gb is not None else "",
    )
    return limits


def mlx_memory() -> dict[str, float]:
    """This process's MLX allocator: arrays alive (active), freed buffers kept for reuse (cache), the most ever
    active (peak), and the limit past which it frees cached buffers first (limit)."""
    return {
        "active": mx.get_active_memory(),
        "cache": mx.get_cache_memory(),
        "peak": mx.get_peak_memory(),
        "limit": mx.get_memory_limit(),
    }
