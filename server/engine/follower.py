"""A follower rank's engine side: the same KV store as rank 0's engine, and the forward passes rank 0 makes.

Rank 0 builds an `Engine(..., channel=StepChannel(world.group))`; every other
rank calls `follow` with its shard of the same model. The engine opens (the
followers then run the same probe forward as rank 0, whose collectives meet)
and sends its KV store's size: every rank holds exactly rank 0's number of
blocks, each block holding this rank's share (its heads, or its layers). Then
rank 0 schedules and the followers repeat its runner calls (mirrored_runner.py)
until rank 0 stops them or is lost. A rank can follow one engine after another
(tests build many); `close_world` tells it there are no more.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from server.engine.mirrored_runner import RunnerFollower, receive_call
from server.engine.paged_cache import KVStore, probe_kv_shape
from server.engine.prefill_buckets import keep_enough_attention_graphs
from server.engine.runner import ModelRunner
from server.engine.step_channel import StepChannel
from server.engine.world import World

log = logging.getLogger(__name__)


def follow(model: Any, world: World) -> RunnerFollower | None:
    """Follow one engine of rank 0's: when it opens, probe the model with it and build a store of exactly its
    number of blocks, then repeat its runner calls until it stops (RankLost if rank 0 or the link is lost).
    Returns the follower (its counts), or None when rank 0 said there is no engine to follow."""
    channel = StepChannel(world.group)
    call = receive_call(channel)
    if call.method == "exit":
        return None
    if call.method != "open":
        raise RuntimeError(f"rank 0 sent {call.method!r} before opening an engine")
    shape = probe_kv_shape(model)  # the same forward rank 0 probes with: its collectives meet this rank's
    sizes = receive_call(channel)
    if sizes.method != "store" or len(sizes.counts) != 3:
        raise RuntimeError(f"rank 0 sent {sizes.method!r} where the KV store's size was due")
    num_blocks, block_size, buckets = sizes.counts
    store = KVStore(shape, num_blocks, block_size)
    if buckets:
        keep_enough_attention_graphs()
    follower = RunnerFollower(ModelRunner(model, store, bool(buckets)), channel)
    log.info(
        "%s follows rank 0: KV pool of %d blocks x %d tokens (%.2f GiB of this rank's share)",
        world.describe(),
        store.num_blocks,
        store.block_size,
        store.nbytes / (1 << 30),
    )
    with mx.stream(mx.new_stream(mx.default_device())):
        follower.run()
    return follower
