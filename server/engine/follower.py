"""A follower rank's engine side: the same KV store as rank 0's engine, and the forward passes rank 0 makes.

Rank 0 builds an `Engine(..., channel=StepChannel(world.group))`; every other
rank calls `follow` with its shard of the same model and the same engine
config. Both derive the same number of KV blocks (each holding this rank's
heads), run the same probe forward while building it, then rank 0 schedules
and the followers repeat its runner calls (mirrored_runner.py) until rank 0
stops them or is lost.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from server.engine.config import EngineConfig
from server.engine.mirrored_runner import RunnerFollower
from server.engine.paged_cache import KVStore
from server.engine.prefill_buckets import buckets_on, keep_enough_attention_graphs
from server.engine.runner import ModelRunner
from server.engine.step_channel import StepChannel
from server.engine.world import World

log = logging.getLogger(__name__)


def follow(model: Any, config: EngineConfig, world: World) -> RunnerFollower:
    """Build this rank's store and runner, follow rank 0 until it says stop (RankLost if it is lost); returns the
    follower (its counts) once stopped."""
    store = KVStore.for_model(model, config.block_size, config.kv_cache_gb, config.num_blocks)
    buckets = buckets_on(config)
    if buckets:
        keep_enough_attention_graphs()
    follower = RunnerFollower(ModelRunner(model, store, buckets), StepChannel(world.group))
    log.info(
        "%s follows rank 0: KV pool of %d blocks x %d tokens (%.2f GiB of this rank's heads)",
        world.describe(),
        store.num_blocks,
        store.block_size,
        store.nbytes / (1 << 30),
    )
    with mx.stream(mx.new_stream(mx.default_device())):
        follower.run()
    return follower
