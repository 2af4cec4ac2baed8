"""The contract between the job supervisor and the trainers: what to train, and what a trainer reports.

The supervisor (server/finetune/supervisor.py) resolves a job into a
`TrainingSpec` and runs a trainer in a worker process; the trainer
(server/finetune/chat_trainer.py for chat/completion models,
server/finetune/embedding_trainer.py for embedding models) calls the
`TrainingHooks` as it goes and returns a `TrainingResult`. Adapters are
written in mlx-lm's adapter layout (`adapter_config.json` +
`adapters.safetensors`) so `load_adapter` can put them on shared base weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

TrainingKind = Literal["chat", "embedding"]


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved values ("auto" already replaced)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


@dataclass(frozen=True)
class TrainingSpec:
    job_id: str
    kind: TrainingKind
    base_path: Path  # the base model's MLX / sentence-transformers directory
    train_file: Path  # validated JSONL
    validation_file: Path | None
    output_dir: Path  # adapters and checkpoints go here
    hyperparameters: Hyperparameters
    seed: int


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based optimizer step
    total_steps: int
    epoch: int  # 1-based
    train_loss: float
    valid_loss: float | None = None  # set on steps where validation ran
    trained_tokens: int = 0  # cumulative


@dataclass(frozen=True)
class CheckpointReport:
    step: int
    epoch: int
    path: Path  # a directory holding adapter_config.json + adapters.safetensors
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, valid_loss, ...


@dataclass(frozen=True)
class TrainingResult:
    adapter_dir: Path  # the final adapter (adapter_config.json + adapters.safetensors)
    steps: int
    trained_tokens: int
    epoch_losses: tuple[float, ...]  # mean train loss of every epoch, in order


class TrainingHooks(Protocol):
    def on_step(self, report: StepReport) -> None: ...

    def on_checkpoint(self, report: CheckpointReport) -> None: ...

    def should_stop(self) -> bool:
        """Checked before every step; True means stop now (the trainer raises TrainingCancelled)."""
        ...


class TrainingCancelled(Exception):
    """Raised by a trainer when `should_stop()` said so."""


@dataclass(frozen=True)
class ExampleError:
    line: int  # 1-based line number in the JSONL file
    message: str


@dataclass(frozen=True)
class ValidationReport:
    examples: int
    tokens: int  # total tokens of the training examples (what one epoch trains on)
    errors: tuple[ExampleError, ...]  # empty when the file is usable
    file: str = "training_file"  # the job field naming the file ("training_file" or "validation_file")

    @property
    def ok(self) -> bool:
        return not self.errors
