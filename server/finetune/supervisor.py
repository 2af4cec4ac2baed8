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

Replicas sharing one database (PostgreSQL): a queued job is claimed by exactly
one replica (`JobStore.claim`, a compare-and-set on its status), which holds a
lease on it and renews it every third of the lease. A replica that dies
stops renewing (its workers end with it: they watch their parent); once the
lease lapses, any other replica's supervisor puts the job back in the queue
(or fails it after MAX_ATTEMPTS starts) and the next free one retrains it. A
replica that finds its lease taken (it could not renew in time) stops its
worker without touching the job. Start-up then leaves other replicas' running
jobs alone. Every few seconds the supervisor also calls `sync`, so models
trained or deleted on another replica appear and disappear here.

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
from server.persistence.database import DATABASE_URL_VARIABLE

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
MAX_ATTEMPTS = 3  # starts of one job (its replicas died) before it fails
SYNC_SECONDS = 2.0
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
        replica: str = "",
        shared: bool = False,
        lease_s: float = 30.0,
        database_url: str | None = None,
        sync: Callable[[], None] | None = None,
    ) -> None:
        """`validate(job)` returns a ValidationReport (server/finetune/spec.py) and the resolved
        hyperparameters as a dict, raises ValueError (bad hyperparameters) or ValidationDeferred (try
        again later); `on_succeeded(job)` serves the new model. With `shared` (replicas share the database)
        jobs are leased by `replica` for `lease_s` seconds, and `sync()` runs every SYNC_SECONDS."""
        self.store = store
        self.validate = validate
        self.on_succeeded = on_succeeded
        self.data_dir = Path(data_dir)
        self.max_jobs = max_jobs
        self.replica = replica
        self.shared = shared
        self.lease_s = lease_s
        self.database_url = database_url
        self.sync = sync
        self._renewed = 0.0
        self._synced = 0.0
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
        """Fail what a previous server left active without a worker; queued jobs simply wait their turn. With a
        shared database, running jobs may be other replicas': their leases say when they are lost."""
        if self.shared:
            return
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
            if self.shared and self.store.release(worker.job_id, self.replica):
                self.store.add_event(worker.job_id, "The replica training this job shut down; the job is queued again")
                log.info("fine-tuning job %s queued again for another replica", worker.job_id)
                continue
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

    def _fail(
        self, job_id: str, message: str, code: str, param: str | None = None, *, owner: str | None = None
    ) -> bool:
        """Fail an active job and log it (with `owner`, only while that replica holds it); False when it had
        already finished."""
        failed = self.store.fail(job_id, message, code=code, param=param, owner=owner)
        if failed:
            log.warning("fine-tuning job %s failed (%s): %s", job_id, code, message)
        return failed

    def _tick(self) -> None:
        if self.shared:
            self._keep_leases()
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
        if not self.store.claim(job.id, self.replica, self.lease_s):
            return  # cancelled meanwhile, or another replica claimed it first
        work = self.store.job_dir(job.id)
        logfile = (work / "worker.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "server.finetune.worker", "--data-dir", str(self.data_dir), "--job", job.id],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._worker_environment(),
            start_new_session=True,
        )
        logfile.close()
        self.store.update(job.id, worker_pid=process.pid)
        with self._lock:
            self.workers[job.id] = _Worker(job.id, process)
        # no tenant and no model id in logs: a key without an organization is its tenant's (bare-hash) name
        log.info("fine-tuning job %s started: %s on %s (worker pid %d)", job.id, job.kind, job.model, process.pid)

    def _worker_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.database_url:
            env[DATABASE_URL_VARIABLE] = self.database_url
        return env

    # -- replicas -----------------------------------------------------------------------------
    def _owner(self) -> str | None:
        """The lease a supervisor's own transitions of a running job require (None: one server, no leases)."""
        return self.replica if self.shared else None

    def _keep_leases(self) -> None:
        now = time.monotonic()
        if now - self._renewed >= self.lease_s / 3:
            self._renewed = now
            with self._lock:
                workers = list(self.workers.values())
            for worker in workers:
                if not self.store.renew(worker.job_id, self.replica, self.lease_s):
                    self._let_go(worker)
            for job in self.store.lapsed():
                self._recover_lapsed(job)
        if self.sync is not None and now - self._synced >= SYNC_SECONDS:
            self._synced = now
            self.sync()

    def _let_go(self, worker: _Worker) -> None:
        """Our lease on a job is gone (cancelled, finished or taken over): stop its worker, leave the job be."""
        job = self.store.get(worker.job_id)
        if job is None or job.status != "running":
            return  # cancelled or finished: _reap does the rest
        log.warning(
            "fine-tuning job %s: this replica lost its lease (now %s's); stopping its worker", job.id, job.lease_owner
        )
        with self._lock:
            self.workers.pop(worker.job_id, None)
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()

    def _recover_lapsed(self, job: Job) -> None:
        """A running job whose replica stopped renewing: done if its model is there, else queued again."""
        if any(m.job_id == job.id for m in self.store.models()):
            if self.store.requeue(job) and self.store.claim(job.id, self.replica, self.lease_s):
                self._finish(self.store.get(job.id) or job)
            return
        if job.attempts >= MAX_ATTEMPTS:
            self.store.fail(
                job.id,
                f"The replicas training this job stopped {job.attempts} times before it finished. "
                "Create the job again to retrain.",
                code="worker_died",
            )
            return
        if self.store.requeue(job):
            self.store.add_event(
                job.id,
                f"The replica training this job stopped (its lease lapsed); the job is queued again "
                f"(attempt {job.attempts + 1} of {MAX_ATTEMPTS})",
                level="warn",
            )
            log.warning("fine-tuning job %s: its replica's lease lapsed; queued again", job.id)
            self._wake.set()

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
                    owner=self._owner(),
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
        if not self.store.transition(job.id, ("running",), "succeeded", owner=self._owner(), fine_tuned_model=name):
            return False
        self.store.add_event(job.id, "The job has successfully completed", data={"fine_tuned_model": name})
        log.info("fine-tuning job %s succeeded: its model, on %s, is served", job.id, job.model)
        return True
