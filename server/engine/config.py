"""Engine and scheduler settings (no MLX import, so the settings module can build them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences decoding together
    prefill_budget: int = 512  # prompt tokens computed per step, across sequences
    admission_timeout: float = 30.0  # seconds a request may wait for blocks before PoolExhaustedError

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.prefill_budget < 1 or self.admission_timeout < 0:
            raise ValueError("max_num_seqs and prefill_budget must be >= 1, admission_timeout >= 0")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_gb: float = 2.0
    num_blocks: int | None = None  # overrides kv_cache_gb when set
    # launch greedy decode steps one ahead (see ModelRunner.decode_ahead); None: on GPUs only, since on
    # a CPU the overlapped host work competes with the matmuls for the same cores
    decode_ahead: bool | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_cache_gb <= 0 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ValueError("block_size, kv_cache_gb and num_blocks must be positive")
