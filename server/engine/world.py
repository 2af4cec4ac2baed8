"""World: this process's place among the ranks that serve one model together, and sharding the model over them.

`mlx.launch` starts the same command on every rank (`--backend ring` over TCP,
`jaccl` between Macs over Thunderbolt RDMA, `nccl` on NVIDIA GPUs, `mpi`) and
tells each its rank in the environment (`MLX_RANK`, plus the backend's own
variables). MLX's own `mx.distributed` is the communication layer: this module
joins its group and asks mlx-lm to split the model (`model.shard(group)`:
tensor parallelism, each rank holding its share of every layer's heads and MLP
columns, the partial results summed across ranks inside the forward).

Rank 0 (the leader) runs the HTTP side and the scheduler; the other ranks
(followers) run the same forward passes in lock step (`mirrored_runner.py`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

BACKENDS = ("any", "ring", "jaccl", "nccl", "mpi")
LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # set by mlx.launch / mpirun for each rank


def launched(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started as one rank of several (by `mlx.launch` or `mpirun`)."""
    return any(name in environ for name in LAUNCH_VARIABLES)


LAUNCHER_POLL_S = 1.0


def watch_launcher(on_gone: Callable[[], None]) -> None:
    """Call `on_gone` once the process that started this rank (mlx.launch, mpirun, a supervisor) is gone: a
    launcher killed outright cannot pass its signal on, and a rank left behind would hold its shard (and, on
    a follower, a core polling for rank 0) forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_S)
        on_gone()

    threading.Thread(target=watch, name="rank-launcher-watch", daemon=True).start()


@dataclass(frozen=True)
class World:
    """The ranks serving one model: this process's rank, their number, the backend and MLX's group."""

    rank: int
    size: int
    backend: str
    group: Any  # mx.distributed.Group

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.backend})"


def join(backend: str = "any") -> World:
    """Join the group `mlx.launch` set up; RuntimeError when the backend cannot start."""
    import mlx.core as mx

    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}: choose from {', '.join(BACKENDS)}")
    group = mx.distributed.init(strict=True, backend=backend)
    return World(rank=group.rank(), size=group.size(), backend=backend, group=group)


@dataclass(frozen=True)
class Shard:
    """What one rank holds of the model."""

    mode: str  # "tensor"
    rank: int
    size: int
    attention_heads: int  # this rank's query heads per layer
    kv_heads: int  # this rank's KV heads per layer (its share of every KV block)

    def describe(self) -> str:
        return (
            f"{self.mode} parallel, rank {self.rank} of {self.size}: {self.attention_heads} attention heads and "
            f"{self.kv_heads} KV heads per layer"
        )


def shard_model(model: Any, world: World) -> Shard:
    """Split `model` over the world by tensor parallelism (mlx-lm's `shard`), after checking it divides evenly."""
    if not hasattr(model, "shard"):
        raise ValueError(
            f"{type(model).__module__} has no tensor-parallel split in mlx-lm (`shard`); serve it on one rank"
        )
    args = getattr(model, "args", None)
    heads = int(getattr(args, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(args, "num_key_value_heads", 0) or heads)
    intermediate = int(getattr(args, "intermediate_size", 0) or 0)
    uneven = [
        f"{name} {value}"
        for name, value in (
            ("attention heads", heads),
            ("KV heads", kv_heads),
            ("intermediate size", intermediate),
        )
        if value and value % world.size
    ]
    if uneven:
        raise ValueError(f"cannot split the model over {world.size} ranks: {', '.join(uneven)} not divisible")
    model.shard(world.group)
    return Shard("tensor", world.rank, world.size, heads // world.size, kv_heads // world.size)
