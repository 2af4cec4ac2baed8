"""JobStore: fine-tuning jobs, their events and checkpoints, and the fine-tuned models they produce.

The server (API, supervisor) and the worker process open the same database
(SQLite, or the replicas' PostgreSQL; tables in job_tables.py); every write is
one short transaction, and with replicas a running job is leased by one. A job's working
directory is `<data-dir>/fine_tuning/<job-id>/` (a private copy of the
training files, checkpoints, the final adapter). Rows carry the tenant that
created them and every read is scoped by it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.finetune.job_tables import SCHEMA
from server.finetune.spec import TrainingKind
from server.persistence.database import Database

ACTIVE = ("validating_files", "queued", "running")
CHECKPOINT_MARK = ":ckpt-step-"  # a checkpoint's model name: <fine-tuned model>:ckpt-step-<step>
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    id: str
    tenant: str
    created_at: int
    model: str
    kind: TrainingKind
    base_path: Path
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # requested ("auto" allowed) until the worker resolves them
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    status: str
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    worker_pid: int | None = None
    estimated_finish: int | None = None
    lease_owner: str | None = None  # the replica training it (while running)
    lease_expires_at: int | None = None
    attempts: int = 0  # how many times a replica started training it


@dataclass(frozen=True)
class Event:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: str


@dataclass(frozen=True)
class Checkpoint:
    id: str
    job_id: str
    created_at: int
    step_number: int
    metrics: dict[str, float]
    path: Path
    model_name: str


@dataclass(frozen=True)
class FineTunedModel:
    id: str
    tenant: str
    job_id: str
    base: str
    kind: str
    adapter_path: Path
    created_at: int


def model_name(base: str, tenant: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<org>:<suffix>:<job id>` (an empty suffix leaves `::`), as OpenAI names them."""
    return f"ft:{base}:{tenant}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def _deadline(lease_s: float) -> int:
    return int(time.time() + lease_s + 0.999)


def _job(row: Any) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        model=row["model"],
        kind=row["kind"],
        base_path=Path(row["base_path"]),
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        hyperparameters=json.loads(row["hyperparameters"]),
        suffix=row["suffix"],
        seed=row["seed"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        status=row["status"],
        error=json.loads(row["error"]) if row["error"] else None,
        fine_tuned_model=row["fine_tuned_model"],
        finished_at=row["finished_at"],
        trained_tokens=row["trained_tokens"],
        result_files=json.loads(row["result_files"]),
        cancel_requested=bool(row["cancel_requested"]),
        worker_pid=row["worker_pid"],
        estimated_finish=row["estimated_finish"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        attempts=row["attempts"],
    )


class JobStore:
    def __init__(self, database: Database, root: Path) -> None:
        self.db = database
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        database.migrate(SCHEMA)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    # -- jobs ---------------------------------------------------------------------------------
    def create(self, job: Job) -> Job:
        with self.db.transaction() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM ft_jobs").fetchone()[0]
            conn.execute(
                "INSERT INTO ft_jobs (id, tenant, seq, created_at, model, kind, base_path, training_file, "
                "validation_file, hyperparameters, suffix, seed, metadata, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.tenant,
                    seq,
                    job.created_at,
                    job.model,
                    job.kind,
                    str(job.base_path),
                    job.training_file,
                    job.validation_file,
                    json.dumps(job.hyperparameters),
                    job.suffix,
                    job.seed,
                    json.dumps(job.metadata) if job.metadata is not None else None,
                    job.status,
                ),
            )
        return job

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job; with a tenant, only that tenant's."""
        if tenant is None:
            row = self.db.query_one("SELECT * FROM ft_jobs WHERE id = ?", (job_id,))
        else:
            row = self.db.query_one("SELECT * FROM ft_jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        return _job(row) if row is not None else None

    def page(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[Job], bool]:
        """Newest first, after the job `after`; optionally only jobs whose metadata holds every pair given."""
        where, params = ["tenant = ?"], [tenant]
        if after:
            anchor = self.db.query_one("SELECT seq FROM ft_jobs WHERE id = ? AND tenant = ?", (after, tenant))
            if anchor is not None:
                where.append("seq < ?")
                params.append(anchor["seq"])
        rows = self.db.query(f"SELECT * FROM ft_jobs WHERE {' AND '.join(where)} ORDER BY seq DESC", tuple(params))
        jobs = [_job(r) for r in rows]
        if metadata:
            jobs = [j for j in jobs if j.metadata and all(j.metadata.get(k) == v for k, v in metadata.items())]
        return jobs[:limit], len(jobs) > limit

    def with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        rows = self.db.query(f"SELECT * FROM ft_jobs WHERE status IN ({marks}) ORDER BY seq", statuses)
        return [_job(r) for r in rows]

    def update(self, job_id: str, **fields: Any) -> None:
        encoded = {
            k: (json.dumps(v) if k in ("error", "result_files", "hyperparameters") and v is not None else v)
            for k, v in fields.items()
        }
        sets = ", ".join(f"{k} = ?" for k in encoded)
        self.db.execute(f"UPDATE ft_jobs SET {sets} WHERE id = ?", (*encoded.values(), job_id))

    def transition(
        self, job_id: str, allowed_from: tuple[str, ...], status: str, *, owner: str | None = None, **fields: Any
    ) -> bool:
        """Set the status only if the job is in one of `allowed_from` (atomic) and, with `owner`, only while that
        replica holds its lease; True when it changed."""
        encoded = {
            k: (json.dumps(v) if k in ("error", "result_files", "hyperparameters") and v is not None else v)
            for k, v in fields.items()
        }
        encoded["status"] = status
        if status in FINAL:
            encoded.setdefault("finished_at", int(time.time()))
        sets = ", ".join(f"{k} = ?" for k in encoded)
        marks = ",".join("?" * len(allowed_from))
        mine = "" if owner is None else " AND lease_owner = ?"
        return (
            self.db.execute(
                f"UPDATE ft_jobs SET {sets} WHERE id = ? AND status IN ({marks}){mine}",
                (*encoded.values(), job_id, *allowed_from, *(() if owner is None else (owner,))),
            )
            > 0
        )

    def fail(
        self,
        job_id: str,
        message: str,
        code: str = "internal_error",
        param: str | None = None,
        *,
        owner: str | None = None,
    ) -> bool:
        """Fail an active job (with `owner`: only while that replica holds it); True when it changed."""
        error = {"code": code, "message": message, "param": param}
        ok = self.transition(job_id, ACTIVE, "failed", owner=owner, error=error)
        if ok:
            self.add_event(job_id, message, level="error")
        return ok

    # -- leases (replicas sharing one database) -----------------------------------------------
    def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        """queued -> running for `owner`, atomically: of several replicas claiming one job, exactly one wins."""
        return (
            self.db.execute(
                "UPDATE ft_jobs SET status = 'running', lease_owner = ?, lease_expires_at = ?, "
                "attempts = attempts + 1 WHERE id = ? AND status = 'queued'",
                (owner, _deadline(lease_s), job_id),
            )
            > 0
        )

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease on its running job; False when the job is no longer its own and running."""
        return (
            self.db.execute(
                "UPDATE ft_jobs SET lease_expires_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'",
                (_deadline(lease_s), job_id, owner),
            )
            > 0
        )

    def lapsed(self) -> list[Job]:
        """Running jobs whose replica stopped renewing its lease."""
        rows = self.db.query(
            "SELECT * FROM ft_jobs WHERE status = 'running' AND lease_expires_at IS NOT NULL "
            "AND lease_expires_at < ? ORDER BY seq",
            (int(time.time()),),
        )
        return [_job(r) for r in rows]

    def requeue(self, job: Job) -> bool:
        """A lapsed job back to `queued` (only if its lease is still the lapsed one); True when it changed."""
        return (
            self.db.execute(
                "UPDATE ft_jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                "worker_pid = NULL WHERE id = ? AND status = 'running' AND lease_owner = ? AND lease_expires_at = ?",
                (job.id, job.lease_owner, job.lease_expires_at),
            )
            > 0
        )

    def release(self, job_id: str, owner: str) -> bool:
        """`owner` gives its running job back to the queue (it shuts down); True when it did."""
        return (
            self.db.execute(
                "UPDATE ft_jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, "
                "worker_pid = NULL WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (job_id, owner),
            )
            > 0
        )

    # -- events -------------------------------------------------------------------------------
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        self.db.execute(
            "INSERT INTO ft_events (id, job_id, created_at, level, message, data, type) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                "ftevent-" + secrets.token_hex(12),
                job_id,
                int(time.time()),
                level,
                message,
                json.dumps(data) if data is not None else None,
                type,
            ),
        )

    def _page_of(self, table: str, job_id: str, after: str | None, limit: int) -> tuple[list[Any], bool]:
        """Rows of a job's events or checkpoints, newest first, older than the row `after`."""
        where, params = ["job_id = ?"], [job_id]
        if after:
            anchor = self.db.query_one(f"SELECT seq FROM {table} WHERE id = ? AND job_id = ?", (after, job_id))
            if anchor is not None:
                where.append("seq < ?")
                params.append(anchor["seq"])
        rows = self.db.query(
            f"SELECT * FROM {table} WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)
        )
        return rows[:limit], len(rows) > limit

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[Event], bool]:
        rows, more = self._page_of("ft_events", job_id, after, limit)
        return [
            Event(
                r["id"],
                r["job_id"],
                r["created_at"],
                r["level"],
                r["message"],
                json.loads(r["data"]) if r["data"] else None,
                r["type"],
            )
            for r in rows
        ], more

    # -- checkpoints --------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, float], path: Path, model_name: str) -> None:
        self.db.execute(
            "INSERT INTO ft_checkpoints (id, job_id, created_at, step_number, metrics, path, model_name) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                "ftckpt-" + secrets.token_hex(12),
                job_id,
                int(time.time()),
                step,
                json.dumps(metrics),
                str(path),
                model_name,
            ),
        )

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[Checkpoint], bool]:
        rows, more = self._page_of("ft_checkpoints", job_id, after, limit)
        return [
            Checkpoint(
                r["id"],
                r["job_id"],
                r["created_at"],
                r["step_number"],
                json.loads(r["metrics"]),
                Path(r["path"]),
                r["model_name"],
            )
            for r in rows
        ], more

    # -- fine-tuned models --------------------------------------------------------------------
    def add_model(self, model: FineTunedModel) -> None:
        self.db.execute(
            "INSERT INTO ft_models (id, tenant, job_id, base, kind, adapter_path, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, "
            "job_id = excluded.job_id, base = excluded.base, kind = excluded.kind, "
            "adapter_path = excluded.adapter_path, created_at = excluded.created_at, deleted = 0",
            (model.id, model.tenant, model.job_id, model.base, model.kind, str(model.adapter_path), model.created_at),
        )

    def models(self) -> list[FineTunedModel]:
        rows = self.db.query("SELECT * FROM ft_models WHERE deleted = 0 ORDER BY created_at")
        return [
            FineTunedModel(
                r["id"], r["tenant"], r["job_id"], r["base"], r["kind"], Path(r["adapter_path"]), r["created_at"]
            )
            for r in rows
        ]

    def delete_model(self, model_id: str, tenant: str) -> bool:
        return (
            self.db.execute(
                "UPDATE ft_models SET deleted = 1 WHERE id = ? AND tenant = ? AND deleted = 0", (model_id, tenant)
            )
            > 0
        )
