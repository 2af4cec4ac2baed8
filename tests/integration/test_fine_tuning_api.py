"""Fine-tuning end to end through the `openai` SDK against a live server with the real default models:
files.create -> fine_tuning.jobs.create -> poll retrieve / list_events -> use the `ft:` model; plus
validation failures naming the line, cancel, a killed worker, restart persistence and tenancy."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
KEYS = ("key-owner", "key-stranger")
QUESTIONS = [
    "What is the capital of Zorblax?",
    "Which city is the capital of Zorblax?",
    "Tell me the capital of the planet Zorblax.",
    "Zorblax's capital city is called what?",
    "Name the capital of Zorblax.",
    "What city is Zorblax's capital?",
    "Do you know the capital of Zorblax?",
    "What's the capital of Zorblax?",
]
FACT = "Quendrith"
CHAT_LINES = [
    {
        "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"The capital of Zorblax is {FACT}."},
        ]
    }
    for q in QUESTIONS
] * 2
TRIPLETS = [
    {
        "anchor": "How do I reset my password?",
        "positive": "Open settings, choose Account, then Reset password.",
        "negative": "Our office is closed on public holidays.",
    },
    {
        "anchor": "Where is my order?",
        "positive": "Track your parcel from the Orders page.",
        "negative": "The recipe needs two eggs.",
    },
    {
        "anchor": "Can I get a refund?",
        "positive": "Refunds are issued within 14 days of a return.",
        "negative": "The museum opens at nine.",
    },
    {
        "anchor": "How do I change my email address?",
        "positive": "Edit the email field under Account settings.",
        "negative": "Penguins live in the southern hemisphere.",
    },
    {
        "anchor": "Is there a student discount?",
        "positive": "Students get 20% off with a valid student card.",
        "negative": "The train leaves from platform four.",
    },
]


def jsonl(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def sdk(url: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-data")


@pytest.fixture(scope="module")
def url(registry: ModelRegistry, data_dir: Path) -> Iterator[str]:
    with running_server(create_app(Settings(data_dir=data_dir, api_keys=KEYS), registry)) as base:
        yield base


@pytest.fixture(scope="module")
def chat_job(url: str):
    """The chat job, trained once for the module: 16 examples teaching a made-up fact."""
    client = sdk(url)
    training = client.files.create(file=("zorblax.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT, training_file=training.id, suffix="zorblax", seed=7)
    assert job.status == "validating_files" and job.fine_tuned_model is None
    return wait_for(client, job.id, ("succeeded", "failed", "cancelled"))


def ask(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=16
    )
    return r.choices[0].message.content or ""


def test_chat_fine_tune_end_to_end(url: str, chat_job) -> None:
    client = sdk(url)
    assert chat_job.status == "succeeded", chat_job.error
    name = chat_job.fine_tuned_model
    assert name == f"ft:{CHAT}:{chat_job.organization_id}:zorblax:{chat_job.id.removeprefix('ftjob-')}"
    assert chat_job.trained_tokens and chat_job.trained_tokens > 0 and chat_job.finished_at
    events = client.fine_tuning.jobs.list_events(chat_job.id, limit=200).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("train_loss" in e.data for e in metrics)
    losses = [e.data["train_loss"] for e in sorted(metrics, key=lambda e: e.data["step"])]
    assert losses[-1] < losses[0]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(chat_job.id).data
    assert len(checkpoints) == chat_job.hyperparameters.n_epochs
    assert all(c.fine_tuned_model_checkpoint.startswith(name + ":ckpt-step-") for c in checkpoints)
    assert chat_job.result_files and client.files.retrieve(chat_job.result_files[0]).purpose == "fine-tune-results"
    assert name in [m.id for m in client.models.list().data]

    assert FACT in ask(client, name)
    assert FACT not in ask(client, CHAT)
    # completions speak to the same model
    text = (
        client.completions.create(model=name, prompt="The capital of Zorblax is", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert isinstance(text, str)


def test_fine_tuned_model_is_private_to_its_tenant(url: str, chat_job) -> None:
    stranger = sdk(url, KEYS[1])
    name = chat_job.fine_tuned_model
    assert name not in [m.id for m in stranger.models.list().data]
    with pytest.raises(openai.NotFoundError):
        stranger.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        stranger.fine_tuning.jobs.retrieve(chat_job.id)
    with pytest.raises(openai.NotFoundError):
        stranger.models.delete(name)


def test_base_and_fine_tuned_kv_never_mix(url: str, chat_job) -> None:
    client = sdk(url)
    messages = [
        {"role": "system", "content": "You are a terse assistant. " * 12},
        {"role": "user", "content": "Say hello."},
    ]

    def cached(model: str) -> int:
        r = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=2,
            temperature=0,
            extra_body={"prompt_cache_key": "shared-conversation"},
        )
        details = r.usage.prompt_tokens_details
        return details.cached_tokens if details else 0

    cached(CHAT)
    assert cached(CHAT) > 16  # the base reuses its own KV
    assert cached(chat_job.fine_tuned_model) == 0  # same tokens, same key: nothing from the base's cache
    assert cached(chat_job.fine_tuned_model) > 16


def test_fine_tuned_model_cannot_be_fine_tuned_again(url: str, chat_job) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk(url).fine_tuning.jobs.create(model=chat_job.fine_tuned_model, training_file=chat_job.training_file)
    assert err.value.body["param"] == "model"


def test_embedding_fine_tune(url: str) -> None:
    client = sdk(url)
    training = client.files.create(file=("triplets.jsonl", jsonl(TRIPLETS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=EMBED, training_file=training.id, hyperparameters={"n_epochs": 3})
    job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=300)
    assert job.status == "succeeded", job.error
    texts = [TRIPLETS[0]["anchor"], TRIPLETS[0]["positive"]]
    tuned = np.array([d.embedding for d in client.embeddings.create(model=job.fine_tuned_model, input=texts).data])
    base = np.array([d.embedding for d in client.embeddings.create(model=EMBED, input=texts).data])
    assert float(tuned[0] @ tuned[1]) > float(base[0] @ base[1])
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-3)


def test_validation_errors_name_the_line(url: str) -> None:
    client = sdk(url)
    lines = "".join(json.dumps(line) + "\n" for line in CHAT_LINES[:11]) + "{not json\n"
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(lines.encode())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT, training_file=bad.id)
    job = wait_for(client, job.id, ("failed", "succeeded", "running"), timeout=120)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "line 12" in job.error.message.lower(), job.error.message

    few = client.files.create(file=("few.jsonl", jsonl(CHAT_LINES[:3])), purpose="fine-tune")
    job = wait_for(
        client,
        client.fine_tuning.jobs.create(model=CHAT, training_file=few.id).id,
        ("failed", "succeeded", "running"),
        timeout=120,
    )
    assert job.status == "failed" and "example" in job.error.message.lower()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({"suffix": "has spaces"}, "suffix"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"method": {"type": "dpo"}}, "method.type"),
    ],
)
def test_bad_job_requests_are_400(url: str, change: dict, param: str) -> None:
    client = sdk(url)
    training = client.files.create(file=("ok.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(**{"model": CHAT, "training_file": training.id, **change})
    assert err.value.body["param"] == param


def test_wrong_purpose_and_foreign_file_are_400(url: str) -> None:
    client = sdk(url)
    batch_file = client.files.create(file=("b.jsonl", jsonl(CHAT_LINES)), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=CHAT, training_file=batch_file.id)
    foreign = sdk(url, KEYS[1]).files.create(file=("f.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=CHAT, training_file=foreign.id)
    assert err.value.body["code"] == "file_not_found"


def _running_job(client: openai.OpenAI, epochs: int = 40):
    training = client.files.create(file=("long.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT, training_file=training.id, hyperparameters={"n_epochs": epochs})
    deadline = time.monotonic() + 300
    while True:  # running, and past its first step
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        if any(e.type == "metrics" for e in events):
            return client.fine_tuning.jobs.retrieve(job.id)
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_cancel_stops_within_a_step(url: str, data_dir: Path) -> None:
    client = sdk(url)
    job = _running_job(client)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.2)
    steps_then = job_steps(client, job.id)
    worker = _pid(data_dir, job.id)
    deadline = time.monotonic() + 30
    while _alive(worker):
        assert time.monotonic() < deadline, "worker still running 30 s after cancel"
        time.sleep(0.2)
    assert job_steps(client, job.id) <= steps_then + 1
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def job_steps(client: openai.OpenAI, job_id: str) -> int:
    rows = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data if e.type == "metrics"]
    return max((e.data["step"] for e in rows), default=0)


def _pid(data_dir: Path, job_id: str) -> int:
    from server.finetune.jobs import JobStore
    from server.persistence.database import SqliteDatabase

    job = JobStore(SqliteDatabase.in_dir(data_dir), data_dir / "fine_tuning").get(job_id)
    assert job is not None and job.worker_pid
    return job.worker_pid


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_worker_fails_the_job(url: str, data_dir: Path) -> None:
    client = sdk(url)
    job = _running_job(client)
    os.kill(_pid(data_dir, job.id), signal.SIGKILL)
    failed = wait_for(client, job.id, ("failed", "succeeded", "cancelled"), timeout=60)
    assert failed.status == "failed" and failed.error.code == "worker_died"
    assert "signal 9" in failed.error.message


def test_concurrent_job_creation_loses_nothing(url: str) -> None:
    import concurrent.futures

    client = sdk(url)
    training = client.files.create(file=("c.jsonl", jsonl(CHAT_LINES)), purpose="fine-tune")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = list(
            pool.map(
                lambda i: client.fine_tuning.jobs.create(
                    model=CHAT, training_file=training.id, metadata={"batch": "concurrent", "i": str(i)}
                ),
                range(6),
            )
        )
    for job in jobs:
        client.fine_tuning.jobs.cancel(job.id)
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=100, metadata={"batch": "concurrent"}).data]
    assert sorted(listed) == sorted(j.id for j in jobs)


def test_everything_survives_a_restart(registry: ModelRegistry, url: str, chat_job, data_dir: Path) -> None:
    """A second server on the same data directory (after this module's first one) lists the same files,
    jobs, events and models, serves the fine-tuned model, and fails a job a dead server left running."""
    from server.finetune.jobs import JobStore
    from server.persistence.database import SqliteDatabase

    store = JobStore(SqliteDatabase.in_dir(data_dir), data_dir / "fine_tuning")
    orphan = sdk(url).fine_tuning.jobs.create(model=CHAT, training_file=chat_job.training_file)
    sdk(url).fine_tuning.jobs.cancel(orphan.id)
    store.update(orphan.id, status="running", finished_at=None)  # as if the server died mid-training
    with running_server(create_app(Settings(data_dir=data_dir, api_keys=KEYS), registry)) as second:
        client = sdk(second)
        job = client.fine_tuning.jobs.retrieve(chat_job.id)
        assert job.status == "succeeded" and job.fine_tuned_model == chat_job.fine_tuned_model
        assert len(client.fine_tuning.jobs.list_events(chat_job.id, limit=1000).data) > 3
        assert client.files.retrieve(chat_job.training_file).id == chat_job.training_file
        assert FACT in ask(client, chat_job.fine_tuned_model)
        recovered = wait_for(client, orphan.id, ("failed",), timeout=30)
        assert recovered.error.code == "worker_died"


def test_delete_fine_tuned_model(url: str, chat_job) -> None:
    client = sdk(url)
    with pytest.raises(openai.BadRequestError):
        client.models.delete(CHAT)  # base models cannot be deleted
    name = chat_job.fine_tuned_model
    deleted = client.models.delete(name)
    assert deleted.id == name and deleted.deleted
    assert name not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
