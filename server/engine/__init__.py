"""The batch engine's public surface: code outside `server/engine/` imports engine names from here only.

What the rest of the server uses: the engine (in this process, `Engine`, or in a process of its own,
`EngineClient` with a `CoreSpec`: the same interface) and its statistics, its
configuration, the request it runs and the events it streams back, the
sampling parameters and grammar spec a request carries, and the errors it
raises. Everything else in this package (block pool, KV manager, scheduler,
runner, kernels) is the engine's own.

Names load on first use (PEP 562 `__getattr__`): the settings module imports
the configs without loading MLX, which keeps the command line fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.block_pool import PoolExhaustedError
    from server.engine.config import EngineConfig, SchedulerConfig
    from server.engine.constraints import GrammarSpec
    from server.engine.core_client import EngineClient, EngineStartError
    from server.engine.core_process import CoreSpec
    from server.engine.engine import Engine, EngineStats
    from server.engine.kv_manager import common_prefix_length
    from server.engine.memory_limits import MemoryLimits, apply_memory_limits, mlx_memory
    from server.engine.request import GenerationRequest, TokenEvent, ValidRequest
    from server.engine.request_stream import EngineUnavailableError, GenerationError, raise_if_failed
    from server.engine.sampling import SamplingParams

_MODULE_OF: dict[str, str] = {
    "PoolExhaustedError": "server.engine.block_pool",
    "EngineConfig": "server.engine.config",
    "SchedulerConfig": "server.engine.config",
    "GrammarSpec": "server.engine.constraints",
    "CoreSpec": "server.engine.core_process",
    "Engine": "server.engine.engine",
    "EngineClient": "server.engine.core_client",
    "EngineStartError": "server.engine.core_client",
    "EngineUnavailableError": "server.engine.request_stream",
    "EngineStats": "server.engine.engine",
    "GenerationError": "server.engine.request_stream",
    "raise_if_failed": "server.engine.request_stream",
    "common_prefix_length": "server.engine.kv_manager",
    "MemoryLimits": "server.engine.memory_limits",
    "apply_memory_limits": "server.engine.memory_limits",
    "mlx_memory": "server.engine.memory_limits",
    "GenerationRequest": "server.engine.request",
    "TokenEvent": "server.engine.request",
    "ValidRequest": "server.engine.request",
    "SamplingParams": "server.engine.sampling",
}

__all__ = [
    "CoreSpec",
    "Engine",
    "EngineClient",
    "EngineStartError",
    "EngineUnavailableError",
    "EngineConfig",
    "EngineStats",
    "GenerationError",
    "GenerationRequest",
    "GrammarSpec",
    "MemoryLimits",
    "PoolExhaustedError",
    "SamplingParams",
    "SchedulerConfig",
    "TokenEvent",
    "apply_memory_limits",
    "mlx_memory",
    "common_prefix_length",
    "raise_if_failed",
    "ValidRequest",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
