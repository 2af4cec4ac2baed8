"""One chat model served over the ranks `mlx.launch` started: which model is split, rank 0's start of it, and a
follower rank's whole life.

    mlx.launch --backend ring --hostfile hosts.json -- mlx-dropin serve --model big=DIR ...

Every rank runs the same command. Each resolves the same models (`prepare`), and
the first chat model (`--model` order, then the defaults) is the one split over
the ranks: each rank loads it and keeps its shard (`engine/world.py`). Rank 0 is
the server: HTTP, the scheduler, every other model (embeddings, further chat
models, fine-tuning), and the split model's engine in its own process, whose
runner tells the other ranks each forward (`engine/mirrored_runner.py`). A
follower rank binds no port and loads nothing else; it follows until rank 0
stops it (exit 0) or is lost (exit 1, and `mlx.launch` stops the rest).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from server.config import Settings
from server.engine.world import Shard, World, shard_model
from server.registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)


def split_model(registry: ModelRegistry) -> ServedModel | None:
    """The chat model the ranks share: the first one registered."""
    return next((m for m in registry.list() if m.kind == "chat" and m.adapter_path is None), None)


def load_shard(served: ServedModel, settings: Settings, world: World) -> tuple[Any, Any, Shard]:
    """This rank's shard of the split model: loaded, then split (no CPU fast layers: they assume whole layers)."""
    from server.models.loading import load_chat_model

    started = time.perf_counter()
    model, tokenizer = load_chat_model(served.path, settings.dtype)
    shard = shard_model(model, world, settings.split)
    log.info("%s: %s in %.1fs", served.id, shard.describe(), time.perf_counter() - started)
    return model, tokenizer, shard


def serve_as_follower(world: World, settings: Settings) -> int:
    """A follower rank's life: its shard of the split model, following rank 0; the process's exit code."""
    from server.engine.follower import follow
    from server.engine.step_channel import RankLost
    from server.model_lifecycle import prepare

    registry = ModelRegistry()
    prepare(registry, settings)
    served = split_model(registry)
    if served is None:
        log.error("%s: no chat model to split over the ranks", world.describe())
        return 1
    model, _, _ = load_shard(served, settings, world)
    try:
        follower = follow(model, world)
    except RankLost as exc:
        log.error("%s: rank 0 is gone (%s); stopping", world.describe(), exc)
        return 1
    if follower is not None:
        log.info("%s: rank 0 stopped the engine after %d forward calls", world.describe(), follower.calls)
    return 0
