"""Fine-tuning wire types: the job request, `fine_tuning.job`, its events and checkpoints, and their lists."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class HyperparametersIn(msgspec.Struct, omit_defaults=True):
    n_epochs: int | str | None = None  # an integer or "auto"
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None


class SupervisedMethod(msgspec.Struct):
    hyperparameters: HyperparametersIn | None = None


class MethodIn(msgspec.Struct):
    type: str
    supervised: SupervisedMethod | None = None


class JobCreateRequest(msgspec.Struct):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None  # accepted and ignored


class JobError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class Hyperparameters(msgspec.Struct):
    n_epochs: int | str
    batch_size: int | str
    learning_rate_multiplier: float | str


class SupervisedOut(msgspec.Struct):
    hyperparameters: Hyperparameters


class MethodOut(msgspec.Struct):
    supervised: SupervisedOut
    type: Literal["supervised"] = "supervised"


class FineTuningJob(msgspec.Struct):
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    method: MethodOut
    metadata: dict[str, str] | None = None
    estimated_finish: int | None = None
    integrations: list[Any] = msgspec.field(default_factory=list)
    user_provided_suffix: str | None = None
    object: Literal["fine_tuning.job"] = "fine_tuning.job"


class JobList(msgspec.Struct):
    data: list[FineTuningJob]
    has_more: bool
    object: Literal["list"] = "list"


class JobEvent(msgspec.Struct):
    id: str
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"


class EventList(msgspec.Struct):
    data: list[JobEvent]
    has_more: bool
    object: Literal["list"] = "list"


class JobCheckpoint(msgspec.Struct):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"


class CheckpointList(msgspec.Struct):
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"
