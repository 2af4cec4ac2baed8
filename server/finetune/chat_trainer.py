"""LoRA fine-tuning of chat / completion models (any mlx-lm architecture), and putting a
trained adapter on a served model.

Choices, and why:
- LoRA rank 8, scale 20 (mlx-lm's defaults, so adapters match what `mlx_lm.lora` writes)
  on every Linear of every block (Llama: q/k/v/o_proj, gate/up/down_proj). Attention-only
  LoRA learns new facts poorly; the MLP projections are where a model stores them.
- Adam at BASE_LEARNING_RATE x learning_rate_multiplier, constant, no warm-up: runs here
  are short (tens to hundreds of steps) and a fact must stick within a few epochs.
- Loss: token-mean cross-entropy over assistant (or completion) tokens only
  (server/finetune/chat_tokens.py). Logits are computed only at those positions when the
  model splits into body + head (checked numerically once): the 49k-wide head and its
  softmax are ~40% of a forward pass on a 135M model, and prompt positions need neither.
- Deterministic for a seed: LoRA init from mx.random.seed(seed), batch order from the loop's
  seeded shuffle, no dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from server.engine import host
from server.finetune.adapters import LoraSettings, add_lora, apply_adapter, rebuild_sharing_weights, save_adapter
from server.finetune.chat_tokens import TokenizedExample
from server.finetune.examples import load_chat_examples
from server.finetune.loop import run_training
from server.finetune.spec import TrainingHooks, TrainingResult, TrainingSpec
from server.models.loading import load_chat_model

BASE_LEARNING_RATE = 1e-4
LORA = LoraSettings(rank=8, scale=20.0, dropout=0.0)
DEFAULT_CONTEXT = 4096  # when the config names no maximum position
VALID_BATCH = 8

Head = Callable[[mx.array], mx.array]


def context_length(model: Any) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or DEFAULT_CONTEXT)


def split_head(model: nn.Module) -> tuple[nn.Module, Head] | None:
    """(body, head) with model(x) == head(body(x)), or None when the model is not built that way
    (logit scaling, soft-capping, other names): then full logits are computed."""
    body = getattr(model, "model", None)
    if body is None:
        return None
    head: Head | None = getattr(model, "lm_head", None)
    if head is None and getattr(body, "embed_tokens", None) is not None:
        head = body.embed_tokens.as_linear
    if head is None:
        return None
    probe = mx.array([[1, 2, 3, 4]])
    try:
        same = mx.allclose(model(probe), head(body(probe)), rtol=1e-4, atol=1e-4).item()
    except Exception:  # noqa: BLE001 - any mismatch in signatures means "not this shape"
        return None
    return (body, head) if same else None


def pad_batch(examples: list[TokenizedExample], pad_id: int) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs, targets, rows): right-padded next-token pairs and the flat indices of trained targets."""
    longest = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), longest), pad_id, dtype=np.int32)
    mask = np.zeros(ids.shape, dtype=bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = e.loss_mask
    rows = np.flatnonzero(mask[:, 1:])
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:].reshape(-1)), mx.array(rows.astype(np.int32))


class ChatRun:
    """The model, optimizer and data of one chat training run (a `Trainable` for the loop)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        train: list[TokenizedExample],
        valid: list[TokenizedExample],
        learning_rate: float,
        adapter_config: dict[str, Any],
    ):
        self.model = model
        self.train = train
        self.valid = valid
        self.adapter_config = adapter_config
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id or 0)
        self.split = split_head(model)
        self.optimizer = optim.Adam(learning_rate=learning_rate)
        self.loss_and_grad = nn.value_and_grad(model, self.mean_loss)

    def logits_at(self, inputs: mx.array, rows: mx.array) -> mx.array:
        if self.split is not None:
            body, head = self.split
            hidden = body(inputs)
            return head(hidden.reshape(-1, hidden.shape[-1])[rows])
        logits = self.model(inputs)
        return logits.reshape(-1, logits.shape[-1])[rows]

    def loss(self, inputs: mx.array, targets: mx.array, rows: mx.array) -> mx.array:
        """Sum of cross-entropy over the trained targets."""
        return nn.losses.cross_entropy(self.logits_at(inputs, rows), targets[rows], reduction="sum")

    def mean_loss(self, inputs: mx.array, targets: mx.array, rows: mx.array) -> mx.array:
        return self.loss(inputs, targets, rows) / rows.size

    def train_step(self, batch: list[int]) -> tuple[float, int]:
        examples = [self.train[i] for i in batch]
        inputs, targets, rows = pad_batch(examples, self.pad_id)
        loss, grads = self.loss_and_grad(inputs, targets, rows)
        self.optimizer.update(self.model, grads)
        mx.eval(loss, self.model.trainable_parameters(), self.optimizer.state)
        return loss.item(), sum(len(e.ids) for e in examples)

    def valid_loss(self) -> float | None:
        if not self.valid:
            return None
        total = count = 0.0
        for start in range(0, len(self.valid), VALID_BATCH):
            inputs, targets, rows = pad_batch(self.valid[start : start + VALID_BATCH], self.pad_id)
            total += host.float_item(self.loss(inputs, targets, rows))
            count += rows.size
        return total / max(count, 1)

    def save_adapter(self, directory: Path) -> None:
        save_adapter(self.model, directory, self.adapter_config)


def train_chat(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    """Train a LoRA adapter on spec.base_path; checkpoints and the final adapter go under spec.output_dir."""
    model, tokenizer = load_chat_model(spec.base_path)
    limit = context_length(model)
    train = load_chat_examples(spec.train_file, tokenizer, limit)
    valid = load_chat_examples(spec.validation_file, tokenizer, limit) if spec.validation_file else []
    mx.random.seed(spec.seed)
    config = add_lora(model, LORA, {"model_kind": "chat", "base_model": str(spec.base_path)})
    model.train()
    run = ChatRun(
        model, tokenizer, train, valid, BASE_LEARNING_RATE * spec.hyperparameters.learning_rate_multiplier, config
    )
    return run_training(run, len(train), spec.hyperparameters, spec.seed, hooks, spec.output_dir)


def load_chat_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply a saved adapter to this model object in place (its Linear layers become LoRA layers)."""
    return apply_adapter(model, adapter_dir)


def chat_model_with_adapter(base_model: nn.Module, adapter_dir: Path) -> nn.Module:
    """A second model with the adapter that shares every base weight array with base_model
    (base_model itself is left unchanged)."""
    # an mlx-lm model class takes its ModelArgs, which nn.Module's own signature does not say
    model_class = cast(Callable[[Any], nn.Module], type(base_model))
    fresh = rebuild_sharing_weights(base_model, lambda: model_class(base_model.args))
    return apply_adapter(fresh, adapter_dir)
