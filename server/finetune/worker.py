"""The training worker process: `python -m server.finetune.worker --data-dir DIR --job ID`.

It trains one job that the supervisor already validated and queued (its
resolved hyperparameters are in the job row), reporting through the server's
database (SQLite, or the replicas' PostgreSQL): metrics events every few steps, a checkpoint row at every
epoch end, `cancel_requested` read before every step. On success it writes the
metrics CSV and the fine-tuned model row, and exits 0; the supervisor then
serves the model and marks the job succeeded. On any exception it marks the
job failed with the reason. If it is killed outright, the supervisor notices
the exit and fails the job instead. It ends when its server does (it watches
its parent): with replicas, a job whose replica died is retrained by another
one, and a worker left behind would race it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import server  # noqa: F401  (OpenBLAS before mlx.core)
from server.finetune.jobs import CHECKPOINT_MARK, FineTunedModel, Job, JobStore, model_name
from server.finetune.spec import (
    CheckpointReport,
    Hyperparameters,
    StepReport,
    TrainingCancelled,
    TrainingResult,
    TrainingSpec,
)
from server.persistence.database import DATABASE_URL_VARIABLE, open_database

log = logging.getLogger("mlx_dropin.finetune.worker")

METRICS_FILE = "metrics.csv"
EVENTS_PER_JOB = 50  # about this many metrics events over a job, plus the first and last step
PARENT_POLL_S = 1.0


def spec_of(job: Job, store: JobStore) -> TrainingSpec:
    hp = job.hyperparameters
    work = store.job_dir(job.id)
    return TrainingSpec(
        job_id=job.id,
        kind=job.kind,
        base_path=job.base_path,
        train_file=work / "train.jsonl",
        validation_file=work / "validation.jsonl" if job.validation_file else None,
        output_dir=work,
        hyperparameters=Hyperparameters(
            int(hp["n_epochs"]), int(hp["batch_size"]), float(hp["learning_rate_multiplier"])
        ),
        seed=job.seed,
    )


class JobHooks:
    """TrainingHooks writing to the job's rows."""

    def __init__(self, store: JobStore, job: Job) -> None:
        self.store = store
        self.job = job
        self.rows: list[dict[str, float | int | str]] = []
        self.server_pid = os.getppid()

    def should_stop(self) -> bool:
        """Cancelled, or orphaned: a server killed outright (kill -9) cannot stop its worker, and the next
        one fails the job at start, so a worker that outlived its server stops at its next step."""
        if os.getppid() != self.server_pid:
            return True
        row = self.store.db.query_one("SELECT cancel_requested, status FROM ft_jobs WHERE id = ?", (self.job.id,))
        return row is None or bool(row["cancel_requested"]) or row["status"] != "running"

    def on_step(self, report: StepReport) -> None:
        self.rows.append(
            {
                "step": report.step,
                "epoch": report.epoch,
                "train_loss": report.train_loss,
                "valid_loss": "" if report.valid_loss is None else report.valid_loss,
                "trained_tokens": report.trained_tokens,
            }
        )
        every = max(1, report.total_steps // EVENTS_PER_JOB)
        if (
            report.step == 1
            or report.step % every == 0
            or report.step == report.total_steps
            or report.valid_loss is not None
        ):
            data: dict[str, float | int] = {
                "step": report.step,
                "total_steps": report.total_steps,
                "epoch": report.epoch,
                "train_loss": report.train_loss,
            }
            message = f"Step {report.step}/{report.total_steps}: training loss={report.train_loss:.4f}"
            if report.valid_loss is not None:
                data["valid_loss"] = report.valid_loss
                message += f", validation loss={report.valid_loss:.4f}"
            self.store.add_event(self.job.id, message, data=data, type="metrics")
        self.store.update(self.job.id, trained_tokens=report.trained_tokens)

    def on_checkpoint(self, report: CheckpointReport) -> None:
        name = (
            f"{model_name(self.job.model, self.job.tenant, self.job.suffix, self.job.id)}{CHECKPOINT_MARK}{report.step}"
        )
        metrics = {"step": float(report.step), **report.metrics}
        self.store.add_checkpoint(self.job.id, report.step, metrics, report.path, name)
        self.store.add_event(
            self.job.id,
            f"Checkpoint created at step {report.step} (epoch {report.epoch})",
            data={"step": report.step, "epoch": report.epoch},
        )

    def write_metrics(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", "train_loss", "valid_loss", "trained_tokens"])
            writer.writeheader()
            writer.writerows(self.rows)


def train(spec: TrainingSpec, hooks: JobHooks) -> TrainingResult:
    # imported here: a trainer loads mlx-lm (with transformers and torch, seconds); a job needs one of the two
    if spec.kind == "embedding":
        from server.finetune.embedding_trainer import train_embedding

        return train_embedding(spec, hooks)
    from server.finetune.chat_trainer import train_chat

    return train_chat(spec, hooks)


def run(data_dir: Path, job_id: str) -> int:
    # the server passes a shared database's URL in the environment, never on the command line (ps shows that)
    store = JobStore(open_database(os.environ.get(DATABASE_URL_VARIABLE), data_dir), Path(data_dir) / "fine_tuning")
    job = store.get(job_id)
    if job is None or job.status != "running":
        log.error("job %s is not running (%s)", job_id, job.status if job else "missing")
        return 2
    hooks = JobHooks(store, job)
    started = time.monotonic()
    store.add_event(job.id, "Fine-tuning job started")
    try:
        result = train(spec_of(job, store), hooks)
    except TrainingCancelled:  # the API already marked the job cancelled
        store.add_event(job.id, f"Training stopped after step {len(hooks.rows)}")
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error
        traceback.print_exc()
        store.fail(
            job.id, f"Training failed: {type(exc).__name__}: {exc}", code="training_failed", owner=job.lease_owner
        )
        return 1
    hooks.write_metrics(store.job_dir(job.id) / METRICS_FILE)
    name = model_name(job.model, job.tenant, job.suffix, job.id)
    store.update(job.id, trained_tokens=result.trained_tokens)
    store.add_event(
        job.id,
        f"Training finished in {time.monotonic() - started:.1f}s: {result.steps} steps, "
        f"{result.trained_tokens} trained tokens",
        data={
            "steps": result.steps,
            "trained_tokens": result.trained_tokens,
            "epoch_losses": list(result.epoch_losses),
        },
    )
    # The model row is the worker's last word; the supervisor registers the model for serving and only
    # then marks the job succeeded, so a client never sees "succeeded" before the model answers.
    store.add_model(FineTunedModel(name, job.tenant, job.id, job.model, job.kind, result.adapter_dir, int(time.time())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one fine-tuning job (started by the server).")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    return run(args.data_dir, args.job)


def _end_with_parent(parent: int) -> None:
    """Exit at once when the server that started this worker is gone (its children are re-parented)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    log.error("the server that started this worker is gone; stopping")
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
