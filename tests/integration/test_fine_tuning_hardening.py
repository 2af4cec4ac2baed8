"""Fine-tuning jobs against hostile files and odd server states, on a live server with the real default
chat model: every bad training file fails its job at once as `invalid_training_file` naming the line
(never `invalid_hyperparameters`, never a supervisor that retries forever); a job that cannot be
validated at all fails too; a job waiting for its base model says so once; job start, success, failure
and cancellation are logged; epoch checkpoints (`...:ckpt-step-N`) answer like the final model."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.finetune.jobs import Job, JobStore
from server.persistence.database import SqliteDatabase
from server.registry import ModelRegistry
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
KEYS = ("key-owner", "key-stranger")
SUPERVISOR = "server.finetune.supervisor"
GOOD = [
    {"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
    for word in ("red", "green", "blue", "cyan", "pink", "gold", "gray", "teal", "lime", "navy")
]


def jsonl(lines: list[object]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


BAD_FILES = {  # name: (bytes, what the error message must say)
    "empty": (b"", "no examples"),
    "garbage": (b"hello there\nthis is not json at all\n", "line 1: invalid json"),
    "binary": (bytes(range(256)) * 8, "line 2: not valid utf-8"),
    "wrong_shape": (jsonl([[1, 2, 3]] * 12), "line 1: expected a json object"),
    "user_only": (jsonl([{"messages": [{"role": "user", "content": "hi"}]}] * 12), "line 1: no assistant message"),
    "deeply_nested": (jsonl([*GOOD[:2], "[" * 100_000, *GOOD]), "line 3: invalid json (nested too deeply)"),
}


def sdk(url: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout}s"
        time.sleep(0.1)


class Records(logging.Handler):
    """The supervisor's log records (a module fixture cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, job_id: str) -> list[str]:
        return [r.getMessage() for r in self.records if job_id in r.getMessage()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-hardening")


@pytest.fixture(scope="module")
def url(registry: ModelRegistry, data_dir: Path) -> Iterator[str]:
    with running_server(create_app(Settings(data_dir=data_dir, api_keys=KEYS), registry)) as base:
        yield base


@pytest.fixture(scope="module")
def trained(url: str) -> Iterator[tuple[object, Records]]:
    """One tiny chat job (10 examples, 2 epochs of one step each), with the supervisor's log records."""
    logger = logging.getLogger(SUPERVISOR)
    records, level = Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        client = sdk(url)
        training = client.files.create(file=("colors.jsonl", io.BytesIO(jsonl(GOOD))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=CHAT,
            training_file=training.id,
            suffix="colors",
            seed=3,
            hyperparameters={"n_epochs": 2, "batch_size": 10},
        )
        yield wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=900), records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_training_files_fail_at_once_naming_the_line(url: str, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SUPERVISOR)
    content, says = BAD_FILES[kind]
    client = sdk(url)
    upload = client.files.create(file=(f"{kind}.jsonl", io.BytesIO(content)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT, training_file=upload.id)
    failed = wait_for(client, job.id, ("failed", "queued", "running", "succeeded"), timeout=15)
    assert failed.status == "failed"
    assert (failed.error.code, failed.error.param) == ("invalid_training_file", "training_file"), failed.error
    assert says in failed.error.message.lower(), failed.error.message
    # the supervisor logs right after it stores the failure, which the client may have read first
    deadline = time.monotonic() + 5
    while not (logged := [r for r in caplog.records if job.id in r.getMessage()]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r.levelno for r in logged] == [logging.WARNING], [r.getMessage() for r in logged]
    assert "failed (invalid_training_file)" in logged[0].getMessage()


def test_a_bad_validation_file_is_named_as_the_validation_file(url: str) -> None:
    client = sdk(url)
    good = client.files.create(file=("good.jsonl", jsonl(GOOD * 2)), purpose="fine-tune")
    content, says = BAD_FILES["garbage"]
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT, training_file=good.id, validation_file=bad.id)
    failed = wait_for(client, job.id, ("failed", "queued", "running", "succeeded"), timeout=15)
    assert failed.status == "failed"
    assert (failed.error.code, failed.error.param) == ("invalid_validation_file", "validation_file"), failed.error
    assert failed.error.message.startswith("The validation file is invalid.") and says in failed.error.message.lower()


def test_a_job_that_cannot_be_validated_fails_instead_of_spinning(
    url: str, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose base model this server does not serve (stored by an earlier server) fails with a reason."""
    caplog.set_level(logging.INFO, logger=SUPERVISOR)
    store = JobStore(SqliteDatabase.in_dir(data_dir), data_dir / "fine_tuning")
    job = Job(
        id="ftjob-orphanedbase0000000000",
        tenant="someone",
        created_at=int(time.time()),
        model="retired-model",
        kind="chat",
        base_path=data_dir,
        training_file="file-x",
        validation_file=None,
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        suffix=None,
        seed=1,
        metadata=None,
        status="validating_files",
    )
    store.job_dir(job.id).mkdir(parents=True)
    (store.job_dir(job.id) / "train.jsonl").write_bytes(jsonl(GOOD))
    store.create(job)
    deadline = time.monotonic() + 5
    while (stored := store.get(job.id)) is not None and stored.status == "validating_files":
        assert time.monotonic() < deadline, "the supervisor keeps retrying the job"
        time.sleep(0.1)
    assert stored is not None and stored.status == "failed" and stored.error is not None
    assert stored.error["code"] == "validation_failed" and "retired-model" in stored.error["message"]
    assert 1 <= sum(job.id in r.getMessage() for r in caplog.records) <= 2  # the failure, said once


def test_a_job_waiting_for_its_base_model_says_so_once(
    registry: ModelRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=SUPERVISOR)
    loading = ModelRegistry()  # the base is registered but the models are not ready: still loading
    loading.add(registry.get(CHAT))
    with running_server(create_app(Settings(data_dir=tmp_path, api_keys=KEYS), loading)) as url:
        client = sdk(url)
        upload = client.files.create(file=("bad.jsonl", io.BytesIO(b"not json\n")), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=CHAT, training_file=upload.id)
        time.sleep(2.5)  # ten supervisor ticks
        assert client.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
        waits = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
        assert len(waits) == 1 and "waits to validate" in waits[0] and "still loading" in waits[0], waits
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
        assert sum("Waiting to validate" in e for e in events) == 1
        loading.mark_ready()  # the models finished loading: the job is validated (and fails on its file)
        failed = wait_for(client, job.id, ("failed", "queued"), timeout=10)
        assert failed.error.code == "invalid_training_file" and "line 1" in failed.error.message.lower()


def test_job_start_success_and_cancel_are_logged(url: str, trained, caplog: pytest.LogCaptureFixture) -> None:
    job, records = trained
    assert job.status == "succeeded", job.error
    lines = records.about(job.id)
    assert any("started" in line for line in lines), lines
    assert any("succeeded" in line for line in lines), lines
    tenant = job.fine_tuned_model.split(":")[2]  # an org, or a key's bare-hash tenant: never logged
    assert not any(tenant in line or job.fine_tuned_model in line for line in lines), lines
    caplog.set_level(logging.INFO, logger=SUPERVISOR)
    client = sdk(url)
    other = client.fine_tuning.jobs.create(
        model=CHAT, training_file=job.training_file, hyperparameters={"n_epochs": 50}
    )
    client.fine_tuning.jobs.cancel(other.id)
    cancelled = [r.getMessage() for r in caplog.records if other.id in r.getMessage() and "cancelled" in r.getMessage()]
    assert len(cancelled) == 1, cancelled


def test_checkpoint_models_answer_like_the_final_model(url: str, trained) -> None:
    job, _ = trained
    assert job.status == "succeeded", job.error
    client, stranger = sdk(url), sdk(url, KEYS[1])
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    names = sorted(c.fine_tuned_model_checkpoint for c in checkpoints)
    assert names == [f"{job.fine_tuned_model}:ckpt-step-1", f"{job.fine_tuned_model}:ckpt-step-2"]
    for name in names:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Say red."}], max_tokens=3, temperature=0
        )
        assert reply.model == name and reply.choices[0].message.content is not None
        assert client.models.retrieve(name).id == name
        with pytest.raises(openai.NotFoundError):  # private to the tenant, like the final model
            stranger.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    listed = [m.id for m in client.models.list().data]
    assert job.fine_tuned_model in listed and not set(names) & set(listed)  # as OpenAI: checkpoints unlisted
    with pytest.raises(openai.BadRequestError) as err:  # a checkpoint goes with its model
        client.models.delete(names[0])
    assert err.value.body["code"] == "model_not_deletable"
    client.models.delete(job.fine_tuned_model)
    for name in names:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
