"""LoRA adapters, on disk and on models, in mlx-lm's layout: `adapter_config.json`
(fine_tune_type, num_layers, lora_parameters) + `adapters.safetensors` (the lora_a /
lora_b leaves only). mlx-lm's `linear_to_lora_layers` and `load_adapters` do the model
surgery for chat models and encoders alike (an `EncoderModel` exposes `.layers` for them).

A served fine-tuned model shares its base model's weights: `rebuild_sharing_weights`
makes a second module tree whose containers are new but whose base arrays are the very
same `mx.array` objects, and the adapter is applied to that tree only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_ROUTER_NAMES = ("gate", "router")  # MoE routers are Linear too; LoRA on them destabilizes routing


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale (mlx-lm's multiplier of the low-rank product) and dropout of every adapter."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0


def block_linear_keys(block: nn.Module) -> list[str]:
    """Paths of the Linear layers inside one transformer block (attention and MLP projections),
    MoE routers excluded: for Llama q/k/v/o_proj + gate/up/down_proj, for BERT query/key/value
    and the three dense layers."""
    keys = []
    for name, module in block.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name.rsplit(".", 1)[-1] not in _ROUTER_NAMES:
            keys.append(name)
    return sorted(keys)


def add_lora(model: nn.Module, settings: LoraSettings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Freeze the model and put LoRA on every Linear of every block; returns the adapter config
    to save with the weights (`extra` keys are recorded alongside, mlx-lm ignores them)."""
    config: dict[str, Any] = {
        "fine_tune_type": "lora",
        "num_layers": len(model.layers),
        "lora_parameters": {
            "rank": settings.rank,
            "scale": settings.scale,
            "dropout": settings.dropout,
            "keys": block_linear_keys(model.layers[0]),
        },
        **(extra or {}),
    }
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    return config


def save_adapter(model: nn.Module, directory: Path, config: dict[str, Any]) -> Path:
    """Write the trainable (LoRA) parameters and the config; the directory appears whole or not at all."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(staging / WEIGHTS_FILE), weights)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory} is not an adapter directory: {exc}") from exc
    return config


def apply_adapter(model: nn.Module, directory: Path) -> nn.Module:
    """Apply a saved adapter to a model in place (mlx-lm's load_adapters) and evaluate its weights."""
    read_adapter_config(directory)  # a clear error before mlx-lm's FileNotFoundError
    load_adapters(model, str(directory))
    model.eval()
    mx.eval(model.parameters())
    return model


M = TypeVar("M", bound=nn.Module)


def _names(tree: Any) -> set[str]:
    """The dotted names of a parameter tree's leaves."""
    # tree_flatten returns a list of (name, leaf) pairs unless given a dict `destination`, which it fills instead
    return {k for k, _ in cast(list[tuple[str, Any]], tree_flatten(tree))}


def rebuild_sharing_weights(base: nn.Module, construct: Callable[[], M]) -> M:
    """A fresh module tree (`construct()` builds the same architecture, unevaluated) holding base's
    arrays: quantized layers are matched first, then every parameter is the base's own object."""
    fresh = construct()
    quantized = {
        name: m for name, m in base.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if quantized:

        def predicate(path: str, _module: nn.Module) -> bool | dict[str, Any]:
            q = quantized.get(path)
            return False if q is None else {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}

        nn.quantize(fresh, class_predicate=predicate)
    base_params = base.parameters()
    missing = _names(fresh.parameters()) - _names(base_params)
    if missing:
        raise ValueError(f"the rebuilt model has parameters the base lacks: {sorted(missing)[:3]}")
    fresh.update(base_params)
    fresh.eval()
    return fresh
