"""The engine the seed's engine integration tests run against when tests/distributed_pytest.py runs them on
rank 0 of a world: `SplitEngine` makes their shared engine a split one whose other ranks follow. In a normal
test run the `split_engine` fixture (conftest.py) is None and nothing changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from server.engine import Engine, EngineConfig
from server.engine.step_channel import StepChannel
from server.engine.world import World

SPLIT_ENGINE = pytest.StashKey["SplitEngine"]()  # where distributed_pytest.py leaves it in pytest's config


@dataclass(frozen=True)
class SplitEngine:
    """Rank 0's shard of a model, and an unsharded copy of it (mlx-lm's references, engines of one process)."""

    reference: tuple[Any, Any]  # (model, tokenizer), whole
    sharded: Any  # the same weights, split over the world
    world: World

    def engine(self, config: EngineConfig) -> Engine:
        """An engine over the shard whose forwards every rank runs (one at a time: the followers follow one
        engine after another, so a test must not start a second split engine while one runs)."""
        return Engine(self.sharded, self.reference[1], config, channel=StepChannel(self.world.group))
