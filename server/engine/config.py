"""Engine and scheduler settings (no MLX import, so the settings module can build them)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# A step's prompt tokens when none are configured, when no sequence is decoding (nobody waits on the
# step but the prompts in it). On a GPU 512 tokens cost little more than one decode step, and admitting
# 128 requests 4 at a time left most of them waiting a second.
DEFAULT_PREFILL_CHUNK = {"cpu": 512, "gpu": 2048}
# The same while streamed sequences are decoding: each one's next token waits for the step. On a CPU a
# prompt token costs about 10 ms (SmolLM2-135M, ~500 tokens of context, server/models/cpu_layers.py;
# 12-16 ms with mlx-lm's own modules), so 64 keep a step (with its decode rows) under a second, and
# requests arriving while others decode get their first token a step or two later instead of after one
# multi-second step (agents benchmark, README).
DEFAULT_DECODING_PREFILL_CHUNK = {"cpu": 64, "gpu": 2048}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences decoding together
    # prompt tokens computed per step, across sequences; None: DEFAULT_PREFILL_CHUNK for the device
    prefill_chunk: int | None = None
    # the same while some streamed sequence is decoding; None: DEFAULT_DECODING_PREFILL_CHUNK for the device
    decoding_prefill_chunk: int | None = None
    queue_timeout: float = 30.0  # seconds a request may wait for blocks before PoolExhaustedError

    def __post_init__(self) -> None:
        budgets = (self.prefill_chunk, self.decoding_prefill_chunk)
        if self.max_num_seqs < 1 or any(b is not None and b < 1 for b in budgets) or self.queue_timeout < 0:
            raise ValueError("max_num_seqs and prefill budgets must be >= 1, queue_timeout >= 0")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_gb: float = 2.0
    num_blocks: int | None = None  # overrides kv_cache_gb when set
    # launch greedy decode steps one ahead (see ModelRunner.decode_ahead); None: on GPUs only, since on
    # a CPU the overlapped host work competes with the matmuls for the same cores
    decode_ahead: bool | None = None
    # build and deliver token events on a thread of their own (see output.py); None: on GPUs only
    output_thread: bool | None = None
    # pad prefill forwards to bucket shapes and run a fresh burst's shapes at start-up (prefill_buckets.py);
    # None: on CUDA only, where each new shape builds a cuDNN attention graph
    prefill_buckets: bool | None = None
    # a step of a model split over ranks that takes longer means a rank hangs: the engine stops for good
    rank_timeout_s: float = 120.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_cache_gb <= 0 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ValueError("block_size, kv_cache_gb and num_blocks must be positive")
        if not self.rank_timeout_s > 0:
            raise ValueError("rank_timeout_s must be positive")


def resolved_config(config: EngineConfig, *, on_gpu: bool) -> EngineConfig:
    """The config with the device's defaults filled in."""
    device = "gpu" if on_gpu else "cpu"
    scheduler = config.scheduler
    budget = scheduler.prefill_chunk or DEFAULT_PREFILL_CHUNK[device]
    decoding = min(budget, scheduler.decoding_prefill_chunk or DEFAULT_DECODING_PREFILL_CHUNK[device])
    return replace(config, scheduler=replace(scheduler, prefill_chunk=budget, decoding_prefill_chunk=decoding))
