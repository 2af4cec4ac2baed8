"""FineTuningSupervisor: moves jobs through their statuses and runs one worker process per training job.

    validating_files --(file checks pass)--> queued --(a slot frees)--> running --> succeeded
           |                                   |                          |-----> failed (error, or the worker died)
           '--> failed (naming the line)       '--> cancelled             '-----> cancelled (within one step)

A thread in the server validates new jobs against the base model's tokenizer
(in process: no weights are loaded for it), starts `server.finetune.worker` in
a child process for at most `max_jobs` jobs at a time (oldest first), and
watches the children: a worker that exits while its job is still `running`
(killed, out of memory) fails the job with the reason. At start-up, jobs left
`running` or `validating_files` by a previous server are failed with a reason
(their worker cannot have survived it), so nothing stays `running` forever.

Validation never spins: `validate` raising `ValidationDeferred` (the base model
is still loading) keeps the job waiting, said once in the log and the job's
events; a ValueError fails it as `invalid_hyperparameters`; any other exception
fails it too (`validation_failed`) instead of being retried every tick. Every
job start, success, failure and cancellation is logged (INFO / WARNING) on this
module's logger.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.finetune.examples import describe
from server.finetune.jobs import Job, JobStore, model_name

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
CANCEL_GRACE_SECONDS = 20.0  # a worker that ignores a cancel this long (e.g. still loading) is killed


class ValidationDeferred(Exception):
    """Raised by `validate` when the job cannot be checked yet (its base model is still loading)."""


@dataclass
class _Worker:
    job_id: str
    process: subprocess.Popen[bytes]
    cancel_sent_at: float | None = None


class FineTuningSupervisor:
    def __init__(
        self,
        store: JobStore,
        *,
        validate: Callable[[Job], Any],
        on_succeeded: Callable[[Job], None],
        data_dir: Path,
        max_jobs: int = 1,
    ) -> None:
        """`validate(job)` returns a ValidationReport (server/finetune/spec.py) and the resolved
        hyperparameters as a dict, raises ValueError (bad hyperparameters) or ValidationDeferred (try
        again later); `on_succeeded(job)` serves the new model."""
        self.store = store
        self.validate = validate
        self.on_succeeded = on_succeeded
        self.data_dir = Path(data_dir)
        self.max_jobs = max_jobs
        self.workers: dict[str, _Worker] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # jobs whose deferred validation was already logged

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._run, name="fine-tuning", daemon=True)
        self._thread.start()

    def recover(self) -> None:
        """Fail what a previous server left active without a worker; queued jobs simply wait their turn."""
        finished = {m.job_id for m in self.store.models()}
        for job in self.store.with_status("running", "validating_files"):
            if job.status == "validating_files":
                continue  # validation is repeatable: the thread does it again
            if job.id in finished:  # the worker finished; the server stopped before marking it
                self._mark_succeeded(job)
                continue
            self._fail(
                job.id,
                "The server stopped while this job was running, so its training worker "
                "stopped too. Create the job again to retrain.",
                code="worker_died",
            )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; running jobs are failed with a reason and their workers terminated."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            workers = list(self.workers.values())
            self.workers.clear()
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            self._fail(
                worker.job_id,
                "The server shut down while this job was running. Create the job again to retrain.",
                code="server_shutdown",
            )

    def wake(self) -> None:
        self._wake.set()

    # -- API actions --------------------------------------------------------------------------
    def cancel(self, job: Job) -> Job:
        """Cancel an active job at once (as OpenAI answers); a running worker sees `cancel_requested` before
        its next step and exits, and one that does not within CANCEL_GRACE_SECONDS is killed."""
        if self.store.transition(job.id, ("validating_files", "queued", "running"), "cancelled", cancel_requested=1):
            self.store.add_event(job.id, "Fine-tuning job cancelled")
            log.info("fine-tuning job %s cancelled (was %s)", job.id, job.status)
            with self._lock:
                worker = self.workers.get(job.id)
                if worker is not None and worker.cancel_sent_at is None:
                    worker.cancel_sent_at = time.monotonic()
            self._wake.set()
        return self.store.get(job.id) or job

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep supervising whatever one job did
                log.exception("fine-tuning supervisor step failed")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _fail(self, job_id: str, message: str, code: str, param: str | None = None) -> bool:
        """Fail an active job and log it; False when it had already finished."""
        failed = self.store.fail(job_id, message, code=code, param=param)
        if failed:
            log.warning("fine-tuning job %s failed (%s): %s", job_id, code, message)
        return failed

    def _tick(self) -> None:
        validating = self.store.with_status("validating_files")
        self._waiting &= {job.id for job in validating}
        for job in validating:
            self._validate(job)
        self._reap()
        with self._lock:
            free = self.max_jobs - len(self.workers)
        if free > 0:
            for job in self.store.with_status("queued")[:free]:
                self._launch(job)

    def _validate(self, job: Job) -> None:
        try:
            report, hyperparameters = self.validate(job)
        except ValidationDeferred as exc:
            if job.id not in self._waiting:  # said once, not every tick
                self._waiting.add(job.id)
                log.info("fine-tuning job %s waits to validate its files: %s", job.id, exc)
                self.store.add_event(job.id, f"Waiting to validate the files: {exc}")
            return
        except ValueError as exc:
            self._fail(job.id, str(exc), code="invalid_hyperparameters", param="hyperparameters")
            return
        except Exception as exc:  # noqa: BLE001 - never retried: a job that cannot be validated fails
            log.exception("validating the files of fine-tuning job %s failed", job.id)
            self._fail(
                job.id,
                f"Validating the files failed: {type(exc).__name__}: {exc}",
                code="validation_failed",
                param="training_file",
            )
            return
        if not report.ok:
            more = f" (and {len(report.errors) - 1} more problems)" if len(report.errors) > 1 else ""
            which = "training" if report.file == "training_file" else "validation"
            self._fail(
                job.id,
                f"The {which} file is invalid. {describe(report.errors[0])}{more}",
                code=f"invalid_{which}_file",
                param=report.file,
            )
            for problem in report.errors[1:20]:
                self.store.add_event(job.id, describe(problem), level="error")
            return
        self.store.update(job.id, hyperparameters=hyperparameters)
        if self.store.transition(job.id, ("validating_files",), "queued"):
            self.store.add_event(job.id, f"Files validated: {report.examples} examples, {report.tokens} tokens")
            self.store.add_event(job.id, "Fine-tuning job queued")

    def _launch(self, job: Job) -> None:
        if not self.store.transition(job.id, ("queued",), "running"):
            return
        work = self.store.job_dir(job.id)
        logfile = (work / "worker.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "server.finetune.worker", "--data-dir", str(self.data_dir), "--job", job.id],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
            start_new_session=True,
        )
        logfile.close()
        self.store.update(job.id, worker_pid=process.pid)
        with self._lock:
            self.workers[job.id] = _Worker(job.id, process)
        # no tenant and no model id in logs: a key without an organization is its tenant's (bare-hash) name
        log.info("fine-tuning job %s started: %s on %s (worker pid %d)", job.id, job.kind, job.model, process.pid)

    def _reap(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            code = worker.process.poll()
            if code is None:
                if worker.cancel_sent_at is None:
                    job = self.store.get(worker.job_id)
                    if job is not None and job.cancel_requested:
                        worker.cancel_sent_at = time.monotonic()
                elif time.monotonic() - worker.cancel_sent_at > CANCEL_GRACE_SECONDS:
                    worker.process.kill()  # reaped on the next tick
                continue
            with self._lock:
                self.workers.pop(worker.job_id, None)
            job = self.store.get(worker.job_id)
            if job is None:
                continue
            trained = any(m.job_id == job.id for m in self.store.models())
            if job.status == "running" and code == 0 and trained:
                self._finish(job)
            elif job.status == "running":
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                self._fail(
                    job.id,
                    f"The training worker died ({how}) before finishing; see "
                    f"{self.store.job_dir(job.id) / 'worker.log'}.",
                    code="worker_died",
                )
            elif job.status == "failed" and job.error:  # the worker failed it (e.g. training_failed)
                log.warning(
                    "fine-tuning job %s failed (%s): %s", job.id, job.error.get("code"), job.error.get("message")
                )
            elif trained and job.status == "cancelled":  # cancelled while finishing: no model survives
                self.store.delete_model(model_name(job.model, job.tenant, job.suffix, job.id), job.tenant)

    def _finish(self, job: Job) -> None:
        """Serve the trained model, then mark the job succeeded (in that order)."""
        name = model_name(job.model, job.tenant, job.suffix, job.id)
        job.fine_tuned_model = name
        try:
            self.on_succeeded(job)
        except Exception:  # noqa: BLE001 - the model row stays; loading is retried on first use
            log.exception("could not register the model of fine-tuning job %s", job.id)
        if not self._mark_succeeded(job):
            self.store.delete_model(name, job.tenant)  # cancelled meanwhile

    def _mark_succeeded(self, job: Job) -> bool:
        name = model_name(job.model, job.tenant, job.suffix, job.id)
        if not self.store.transition(job.id, ("running",), "succeeded", fine_tuned_model=name):
            return False
        self.store.add_event(job.id, "The job has successfully completed", data={"fine_tuned_model": name})
        log.info("fine-tuning job %s succeeded: its model, on %s, is served", job.id, job.model)
        return True
