"""FineTuning: the server side of `/v1/fine_tuning/jobs` and of serving `ft:` models.

It checks a job request (400s for what can be known at once: unknown or
unsupported model, missing or foreign files, bad hyperparameters), copies the
files into the job's directory (deleting the upload later cannot break the
job), hands the job to the `FineTuningSupervisor`, and turns finished jobs into
models: each is registered under `ft:<base>:<org>:<suffix>:<job-id>`, visible
only to its tenant, and loaded on first use by putting its adapter on the
base model's shared weights with its own engine (so its KV never mixes with
the base model's or another adapter's). At most `--max-loaded-adapters` stay
loaded; the least recently used idle one is unloaded to make room.

A succeeded job's epoch checkpoints are served too, under the ids
`checkpoints.list` gives (`<model>:ckpt-step-N`): visible only to the tenant,
callable like the final model, left out of `GET /v1/models` (as OpenAI does),
and removed with the final model when it is deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from server.config import Settings
from server.embeddings.encoder import Encoder
from server.engine import apply_memory_limits
from server.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from server.finetune.examples import resolve_hyperparameters, validate_chat_file, validate_embedding_file
from server.finetune.jobs import CHECKPOINT_MARK, Checkpoint, Job, JobStore
from server.finetune.spec import Hyperparameters, ValidationReport
from server.finetune.supervisor import FineTuningSupervisor, ValidationDeferred
from server.finetune.worker import METRICS_FILE
from server.model_lifecycle import base_weights, start_model, unload
from server.persistence.database import Database
from server.persistence.files import FileStore
from server.registry import ModelRegistry, ServedModel
from server.wire.fine_tuning import JobCreateRequest

log = logging.getLogger(__name__)

SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESULTS_PURPOSE = "fine-tune-results"


def requested_hyperparameters(body: JobCreateRequest) -> dict[str, Any]:
    """The hyperparameters as asked: `method.supervised.hyperparameters`, else the older top-level field."""
    if body.method is not None:
        if body.method.type != "supervised":
            raise InvalidRequestError(
                f"Fine-tuning method '{body.method.type}' is not supported; use 'supervised'.", param="method.type"
            )
        given = body.method.supervised.hyperparameters if body.method.supervised else None
        if given is None:
            given = body.hyperparameters
    else:
        given = body.hyperparameters
    out: dict[str, Any] = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    if given is not None:
        for name in out:
            value = getattr(given, name)
            if value is not None:
                out[name] = value
    return out


def check_hyperparameters(values: dict[str, Any]) -> None:
    limits = {"n_epochs": (1, 50), "batch_size": (1, 256)}
    for name, value in values.items():
        if value == "auto":
            continue
        if isinstance(value, str) or isinstance(value, bool):
            raise InvalidRequestError(f"'{name}' must be a number or \"auto\".", param=f"hyperparameters.{name}")
        if name in limits:
            low, high = limits[name]
            if not isinstance(value, int) or not low <= value <= high:
                raise InvalidRequestError(
                    f"'{name}' must be an integer between {low} and {high}.", param=f"hyperparameters.{name}"
                )
        elif not 0 < value <= 100:
            raise InvalidRequestError(
                "'learning_rate_multiplier' must be greater than 0 and at most 100.", param=f"hyperparameters.{name}"
            )


class FineTuning:
    def __init__(self, settings: Settings, database: Database, files: FileStore, registry: ModelRegistry) -> None:
        self.settings = settings
        self.files = files
        self.registry = registry
        self.store = JobStore(database, settings.data_dir / "fine_tuning")
        self.supervisor = FineTuningSupervisor(
            self.store,
            validate=self._validate,
            on_succeeded=self._serve,
            data_dir=settings.data_dir,
            max_jobs=settings.max_training_jobs,
            replica=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            shared=database.shared,
            lease_s=settings.fine_tuning_lease_s,
            database_url=settings.database_url,
            sync=self.sync_models if database.shared else None,
        )
        registry.adapter_loader = self._load_adapter
        self._registered: set[str] = set()  # the models this service put in the registry

    def start(self) -> None:
        self.supervisor.start()

    def register_models(self) -> None:
        """List every stored fine-tuned model whose base is served (after the registry is built)."""
        for model in self.store.models():
            job = self.store.get(model.job_id)
            if job is not None:
                self._serve(job, publish=False)

    def shutdown(self) -> None:
        """Stop the supervisor and take this service's models out of the registry (it may outlive the app)."""
        self.supervisor.shutdown()
        for model_id in list(self._registered):
            served = self.registry.remove(model_id)
            if served is not None:
                _unload_adapter(served)
        self._registered.clear()
        if self.registry.adapter_loader == self._load_adapter:
            self.registry.adapter_loader = None

    # -- jobs ---------------------------------------------------------------------------------
    def base_model(self, model_id: str, tenant: str) -> ServedModel:
        served = self.registry.get(model_id, tenant)
        if served.adapter_path is not None:
            raise InvalidRequestError(
                f"Model {model_id} is itself fine-tuned; fine-tune its base "
                f"'{served.base.id if served.base else ''}' instead.",
                param="model",
                code="model_not_available",
            )
        if served.shard is not None:
            raise InvalidRequestError(
                f"Model {model_id} is split over {served.shard.size} ranks (mlx.launch); fine-tuning a split model is "
                "not supported: fine-tune it on a server that holds it whole.",
                param="model",
                code="model_not_available",
            )
        if served.kind == "embedding":
            if served.encoder is not None and not isinstance(served.encoder, Encoder):
                raise InvalidRequestError(
                    f"Model {model_id} (a decoder embedding model) cannot be fine-tuned "
                    f"here; encoder models (BERT, XLM-RoBERTa) can.",
                    param="model",
                    code="model_not_available",
                )
        return served

    def _training_file(self, file_id: str, tenant: str, param: str) -> Path:
        stored = self.files.get(tenant, file_id)
        if stored is None:
            raise InvalidRequestError(f"File {file_id} not found.", param=param, code="file_not_found")
        if stored.purpose != "fine-tune":
            raise InvalidRequestError(
                f"File {file_id} has purpose '{stored.purpose}'; upload training data with purpose 'fine-tune'.",
                param=param,
                code="invalid_file_purpose",
            )
        return self.files.path(stored.id)

    def create(self, body: JobCreateRequest, tenant: str) -> Job:
        base = self.base_model(body.model, tenant)
        hyperparameters = requested_hyperparameters(body)
        check_hyperparameters(hyperparameters)
        if body.seed is not None and not 0 <= body.seed < 2**63:  # SQLite's INTEGER; mx.random.seed takes no sign
            raise InvalidRequestError("'seed' must be an integer from 0 to 2**63 - 1.", param="seed")
        if body.suffix is not None and not SUFFIX.match(body.suffix):
            raise InvalidRequestError("'suffix' may hold up to 64 letters, digits, '-' and '_'.", param="suffix")
        if body.metadata is not None and (
            len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())
        ):
            raise InvalidRequestError(
                "'metadata' holds at most 16 pairs (keys up to 64, values up to 512 characters).", param="metadata"
            )
        train = self._training_file(body.training_file, tenant, "training_file")
        valid = self._training_file(body.validation_file, tenant, "validation_file") if body.validation_file else None
        job_id = "ftjob-" + secrets.token_hex(12)
        work = self.store.job_dir(job_id)
        work.mkdir(parents=True)
        shutil.copyfile(train, work / "train.jsonl")
        if valid is not None:
            shutil.copyfile(valid, work / "validation.jsonl")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job = Job(
            id=job_id,
            tenant=tenant,
            created_at=int(time.time()),
            model=base.id,
            kind=base.kind,
            base_path=base.path,
            training_file=body.training_file,
            validation_file=body.validation_file,
            hyperparameters=hyperparameters,
            suffix=body.suffix,
            seed=seed,
            metadata=body.metadata,
            status="validating_files",
        )
        self.store.create(job)
        self.store.add_event(job.id, f"Validating training file: {body.training_file}")
        self.supervisor.wake()
        return self.store.get(job.id) or job

    def get(self, job_id: str, tenant: str) -> Job:
        job = self.store.get(job_id, tenant)
        if job is None:
            raise NotFoundError(
                f"Could not find fine-tuning job {job_id}.", param="fine_tuning_job_id", code="job_not_found"
            )
        return job

    def cancel(self, job_id: str, tenant: str) -> Job:
        job = self.get(job_id, tenant)
        if job.status in ("succeeded", "failed", "cancelled"):
            raise InvalidRequestError(
                f"Job {job_id} has already {job.status}; only active jobs can be cancelled.",
                param="fine_tuning_job_id",
                code="job_not_cancellable",
            )
        return self.supervisor.cancel(job)

    # -- validation (supervisor thread) -------------------------------------------------------
    def _validation_base(self, job: Job) -> ServedModel:
        """The loaded base model to check a job's files against; ValidationDeferred while it loads."""
        if not self.registry.ready:
            if self.registry.failure:
                raise RuntimeError(f"the server's models failed to load ({self.registry.failure})")
            raise ValidationDeferred(f"the base model {job.model} is still loading")
        try:
            base = self.registry.get(job.model)
        except ModelNotFoundError:
            raise RuntimeError(f"the base model {job.model} is not served by this server") from None
        if not base.loaded:
            raise ValidationDeferred(f"the base model {job.model} is still loading")
        return base

    def _validate(self, job: Job) -> tuple[ValidationReport, dict[str, Any]]:
        """The first bad file's report (hyperparameters are resolved only for good files)."""
        base = self._validation_base(job)
        work = self.store.job_dir(job.id)
        files = [work / "train.jsonl"] + ([work / "validation.jsonl"] if job.validation_file else [])
        reports = []
        for path in files:
            if job.kind == "embedding":
                reports.append(validate_embedding_file(path, base.encoder))
            else:
                reports.append(validate_chat_file(path, base.tokenizer, base.running_engine.context_length))
        for report, field in zip(reports, ("training_file", "validation_file")):
            if not report.ok:
                return dataclasses.replace(report, file=field), {}
        report = reports[0]
        hp = job.hyperparameters
        resolved: Hyperparameters = resolve_hyperparameters(
            job.kind, reports[0].examples, hp.get("n_epochs"), hp.get("batch_size"), hp.get("learning_rate_multiplier")
        )
        return report, {
            "n_epochs": resolved.n_epochs,
            "batch_size": resolved.batch_size,
            "learning_rate_multiplier": resolved.learning_rate_multiplier,
        }

    # -- serving ------------------------------------------------------------------------------
    def _serve(self, job: Job, publish: bool = True) -> None:
        """Register a succeeded job's model (and publish its metrics CSV as a result file)."""
        models = [m for m in self.store.models() if m.job_id == job.id]
        if not models:
            return
        model = models[0]
        try:
            base = self.registry.get(model.base)
        except Exception:  # noqa: BLE001 - the base is not served by this server now
            log.warning("not serving %s: its base %s is not served", model.id, model.base)
            return
        self._register(_adapter_model(model.id, base, job.tenant, model.created_at, model.adapter_path))
        for checkpoint in self._checkpoints(job.id):
            if checkpoint.path.is_dir():
                self._register(
                    _adapter_model(
                        checkpoint.model_name, base, job.tenant, checkpoint.created_at, checkpoint.path, listed=False
                    )
                )
        metrics = self.store.job_dir(job.id) / METRICS_FILE
        if publish and metrics.is_file() and not job.result_files:
            with metrics.open("rb") as f:
                stored = self.files.add(job.tenant, f"{job.id}-metrics.csv", RESULTS_PURPOSE, f, 1 << 30)
            self.store.update(job.id, result_files=[stored.id])

    def _register(self, served: ServedModel) -> None:
        """Add a fine-tuned model (or checkpoint) to the registry unless it is there already."""
        try:
            self.registry.get(served.id)
        except ModelNotFoundError:
            self.registry.add(served)
            self._registered.add(served.id)

    def _checkpoints(self, job_id: str) -> list[Checkpoint]:
        checkpoints, _ = self.store.checkpoints(job_id, None, 1000)
        return checkpoints

    def _load_adapter(self, served: ServedModel) -> None:
        """Put the adapter on the base's shared weights, with its own engine or batcher."""
        assert served.base is not None and served.adapter_path is not None
        self._make_room()
        started = time.perf_counter()
        if served.kind == "embedding":
            # the trainers are imported here: they load mlx-lm (with transformers and torch, seconds)
            from server.finetune.embedding_trainer import encoder_with_adapter

            base_encoder = served.base.loaded_encoder
            if not isinstance(base_encoder, Encoder):  # job creation takes only a BERT-family base
                raise RuntimeError(f"model {served.base.id!r} has no encoder that takes an adapter")
            start_model(served, self.settings, encoder=encoder_with_adapter(base_encoder, served.adapter_path))
        else:
            from server.finetune.chat_trainer import chat_model_with_adapter

            start_model(
                served,
                self.settings,
                model=chat_model_with_adapter(base_weights(served.base, self.settings), served.adapter_path),
                tokenizer=served.base.tokenizer,
                engine_config=self.settings.adapter_engine_config(),
            )
        # what is resident here changed (with --engine process these may be the process's first MLX weights)
        apply_memory_limits(self.settings.mlx_cache_gb)
        log.info("loaded adapter %s in %.1fs", served.id, time.perf_counter() - started)

    def _make_room(self) -> None:
        loaded = [m for m in self.registry.list() if m.adapter_path is not None and m.loaded]
        while len(loaded) >= self.settings.max_loaded_adapters:
            idle = [m for m in loaded if m.engine is None or not m.engine.has_work]
            if not idle:
                return  # everyone is busy: go over the cap rather than abort requests
            victim = min(idle, key=lambda m: m.last_used)
            _unload_adapter(victim)
            loaded.remove(victim)

    def delete_model(self, model_id: str, tenant: str) -> bool:
        served = self.registry.get(model_id, tenant)
        if served.adapter_path is None or served.owner != tenant:
            raise InvalidRequestError(
                f"Model '{model_id}' is not a fine-tuned model of yours and cannot be deleted.",
                param="model",
                code="model_not_deletable",
            )
        if not served.listed:
            raise InvalidRequestError(
                f"Model '{model_id}' is a checkpoint; it is deleted with its fine-tuned "
                f"model '{model_id.rsplit(':', 1)[0]}'.",
                param="model",
                code="model_not_deletable",
            )
        job_ids = [m.job_id for m in self.store.models() if m.id == model_id]
        self.store.delete_model(model_id, tenant)
        doomed = [served] + [self._forget(c.model_name) for job_id in job_ids for c in self._checkpoints(job_id)]
        self._forget(model_id)
        for gone in doomed:
            if gone is not None and gone.adapter_path is not None:
                _unload_adapter(gone)
                shutil.rmtree(gone.adapter_path, ignore_errors=True)
        return True

    def sync_models(self) -> None:
        """With replicas: serve the models other replicas trained, drop the ones they deleted (the database says)."""
        stored = {m.id: m for m in self.store.models()}
        for model in stored.values():
            if model.id in self._registered or not self._serves(model.base):
                continue  # served already, or its base is not served here (said once, at start-up)
            job = self.store.get(model.job_id)
            if job is not None and job.status == "succeeded":
                try:
                    self._serve(job, publish=False)
                except ValueError:  # registered meanwhile by this replica's own supervisor or a request
                    continue
        for model_id in list(self._registered):
            if model_id.split(CHECKPOINT_MARK, 1)[0] not in stored:
                gone = self._forget(model_id)
                if gone is not None:
                    _unload_adapter(gone)

    def _serves(self, model_id: str) -> bool:
        try:
            self.registry.get(model_id)
        except ModelNotFoundError:
            return False
        return True

    def _forget(self, model_id: str) -> ServedModel | None:
        self._registered.discard(model_id)
        return self.registry.remove(model_id)


def _unload_adapter(served: ServedModel) -> None:
    unload(served)
    served.model = served.engine = served.encoder = served.batcher = None


def _adapter_model(
    model_id: str, base: ServedModel, tenant: str, created: int, adapter_path: Path, listed: bool = True
) -> ServedModel:
    """A fine-tuned model (or, unlisted, one of its checkpoints): the base's weights plus an adapter, the tenant's
    own."""
    return ServedModel(
        id=model_id,
        kind=base.kind,
        path=base.path,
        created=created,
        owned_by=tenant,
        owner=tenant,
        base=base,
        adapter_path=adapter_path,
        listed=listed,
    )
