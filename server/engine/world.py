"""World: this process's place among the ranks that serve one model together, and sharding the model over them.

`mlx.launch` starts the same command on every rank (`--backend ring` over TCP,
`jaccl` between Macs over Thunderbolt RDMA, `nccl` on NVIDIA GPUs, `mpi`) and
tells each its rank in the environment (`MLX_RANK`, plus the backend's own
variables). MLX's own `mx.distributed` is the communication layer: this module
joins its group and asks mlx-lm to split the model: `model.shard(group)`,
tensor parallelism, each rank holding its share of every layer's heads and MLP
columns, the partial results summed across ranks inside the forward; or
`model.model.pipeline(group)`, pipeline parallelism, each rank holding a run of
whole layers (the last rank the first layers, rank 0 the last), the hidden
state sent from rank to rank and the result gathered to all. Tensor parallelism
is taken where the model has it and its heads divide evenly, else pipeline
(`--split` chooses).

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
SPLITS = ("auto", "tensor", "pipeline")
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

    mode: str  # "tensor" or "pipeline"
    rank: int
    size: int
    attention_heads: int  # this rank's query heads per layer
    kv_heads: int  # this rank's KV heads per layer (its share of every KV block)
    layers: tuple[int, int] | None = None  # pipeline: the layers [start, end) this rank runs, of...
    num_layers: int = 0  # ...the model's

    def describe(self) -> str:
        if self.mode == "pipeline" and self.layers is not None:
            start, end = self.layers
            return (
                f"pipeline parallel, rank {self.rank} of {self.size}: layers {start}-{end - 1} of {self.num_layers} "
                f"({self.attention_heads} attention heads and {self.kv_heads} KV heads each)"
            )
        return (
            f"{self.mode} parallel, rank {self.rank} of {self.size}: {self.attention_heads} attention heads and "
            f"{self.kv_heads} KV heads per layer"
        )


def _widths(model: Any) -> tuple[int, int, int]:
    """The model's attention heads, KV heads and MLP intermediate size per layer (0 where its config lacks one)."""
    args = getattr(model, "args", None)
    heads = int(getattr(args, "num_attention_heads", 0) or 0)
    return heads, int(getattr(args, "num_key_value_heads", 0) or heads), int(getattr(args, "intermediate_size", 0) or 0)


def _tensor_split_problem(model: Any, size: int) -> str | None:
    """Why `model` cannot be split by tensor parallelism over `size` ranks, or None."""
    if not hasattr(model, "shard"):
        return f"{type(model).__module__} has no tensor-parallel split in mlx-lm (`shard`)"
    heads, kv_heads, intermediate = _widths(model)
    uneven = [
        f"{name} {value}"
        for name, value in (("attention heads", heads), ("KV heads", kv_heads), ("intermediate size", intermediate))
        if value and value % size
    ]
    return f"{', '.join(uneven)} not divisible by {size} ranks" if uneven else None


def _pipeline_split_problem(model: Any, size: int) -> str | None:
    """Why `model` cannot be split by pipeline parallelism over `size` ranks, or None."""
    body: Any = getattr(model, "model", None)
    if not hasattr(body, "pipeline"):
        return f"{type(model).__module__} has no pipeline split in mlx-lm (`model.pipeline`)"
    if len(body.layers) < size:
        return f"{len(body.layers)} layers cannot go to {size} ranks"
    return None


def shard_model(model: Any, world: World, split: str = "auto") -> Shard:
    """Split `model` over the world: tensor parallelism (mlx-lm's `shard`) or pipeline parallelism (its
    `model.pipeline`), as `split` says; `auto` takes tensor parallelism where it divides evenly, else
    pipeline. ValueError saying why when the model cannot be split that way."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    problems = {
        "tensor": _tensor_split_problem(model, world.size),
        "pipeline": _pipeline_split_problem(model, world.size),
    }
    modes = ("tensor", "pipeline") if split == "auto" else (split,)
    mode = next((m for m in modes if problems[m] is None), None)
    if mode is None:
        reasons = "; ".join(problems[m] or "" for m in modes)
        raise ValueError(f"cannot split the model over {world.size} ranks: {reasons}; serve it on one rank")
    heads, kv_heads, _ = _widths(model)
    if mode == "tensor":
        model.shard(world.group)
        return Shard("tensor", world.rank, world.size, heads // world.size, kv_heads // world.size)
    body = model.model
    num_layers = len(body.layers)
    body.pipeline(world.group)
    return Shard("pipeline", world.rank, world.size, heads, kv_heads, (body.start_idx, body.end_idx), num_layers)
