"""The epoch/step loop both trainers share: a seeded shuffle per epoch, a cancellation check
before every step, a `StepReport` after every step, validation loss and a checkpoint at
every epoch end, and the final adapter.

    output_dir/
      checkpoint-{step}/   adapter_config.json + adapters.safetensors   (one per epoch)
      adapter/             the final adapter (same as the last checkpoint)

A trainer supplies the model-specific part as a `Trainable`; the loop owns the order of
events the supervisor sees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from server.finetune.spec import (
    CheckpointReport,
    Hyperparameters,
    StepReport,
    TrainingCancelled,
    TrainingHooks,
    TrainingResult,
)

FINAL_ADAPTER = "adapter"


class Trainable(Protocol):
    def train_step(self, batch: list[int]) -> tuple[float, int]:
        """One optimizer step on these training examples; (loss before the update, tokens in the batch)."""
        ...

    def valid_loss(self) -> float | None:
        """Mean loss over the validation set, or None without one."""
        ...

    def save_adapter(self, directory: Path) -> None: ...


def plan_steps(n_examples: int, hyperparameters: Hyperparameters) -> tuple[int, int]:
    """(batch size actually used, steps per epoch); the last batch of an epoch may be short."""
    batch = max(1, min(hyperparameters.batch_size, n_examples))
    return batch, math.ceil(n_examples / batch)


def run_training(
    trainable: Trainable,
    n_examples: int,
    hyperparameters: Hyperparameters,
    seed: int,
    hooks: TrainingHooks,
    output_dir: Path,
) -> TrainingResult:
    """Train for hyperparameters.n_epochs; raises TrainingCancelled when hooks.should_stop() says so."""
    batch, per_epoch = plan_steps(n_examples, hyperparameters)
    total = per_epoch * hyperparameters.n_epochs
    rng = np.random.default_rng(seed)
    step = tokens = 0
    epoch_losses: list[float] = []
    for epoch in range(1, hyperparameters.n_epochs + 1):
        order = rng.permutation(n_examples).tolist()
        losses = []
        for start in range(0, n_examples, batch):
            if hooks.should_stop():
                raise TrainingCancelled(f"cancelled before step {step + 1} of {total}")
            loss, batch_tokens = trainable.train_step(order[start : start + batch])
            step += 1
            tokens += batch_tokens
            losses.append(loss)
            valid = trainable.valid_loss() if start + batch >= n_examples else None
            hooks.on_step(
                StepReport(
                    step=step, total_steps=total, epoch=epoch, train_loss=loss, valid_loss=valid, trained_tokens=tokens
                )
            )
        epoch_losses.append(float(np.mean(losses)))
        metrics = {"train_loss": epoch_losses[-1]}
        if valid is not None:
            metrics["valid_loss"] = valid
        checkpoint = Path(output_dir) / f"checkpoint-{step}"
        trainable.save_adapter(checkpoint)
        hooks.on_checkpoint(CheckpointReport(step=step, epoch=epoch, path=checkpoint, metrics=metrics))
    final = Path(output_dir) / FINAL_ADAPTER
    trainable.save_adapter(final)
    return TrainingResult(adapter_dir=final, steps=step, trained_tokens=tokens, epoch_losses=tuple(epoch_losses))
