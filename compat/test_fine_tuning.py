"""Files and fine-tuning endpoints as the `openai` SDK uses them: object shapes, paging, errors.

No job here trains to the end (that takes minutes on a CPU); one job is created and cancelled, which
exercises create, retrieve, list, events, checkpoints and cancel with the SDK's own types.
"""

from __future__ import annotations

import io
import json

import openai
import pytest

CHAT_LINES = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> str:
    body = "".join(json.dumps(line) + "\n" for line in CHAT_LINES).encode()
    return client.files.create(file=("compat-train.jsonl", io.BytesIO(body)), purpose="fine-tune").id


def test_files_shapes(client: openai.OpenAI) -> None:
    data = b'{"prompt": "a", "completion": "b"}\n'
    f = client.files.create(file=("shape.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert f.object == "file" and f.id.startswith("file-") and f.bytes == len(data) and f.filename == "shape.jsonl"
    assert f.purpose == "fine-tune" and f.status == "processed" and isinstance(f.created_at, int)
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == data
    page = client.files.list(limit=1)
    assert page.object == "list" and len(page.data) == 1 and isinstance(page.has_more, bool)
    deleted = client.files.delete(f.id)
    assert deleted.id == f.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_fine_tuning_job_shapes_and_cancel(client: openai.OpenAI, chat_model: str, training_file: str) -> None:
    job = client.fine_tuning.jobs.create(
        model=chat_model,
        training_file=training_file,
        suffix="compat",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
        metadata={"kit": "compat"},
    )
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.model == chat_model
    assert job.status in ("validating_files", "queued", "running") and job.training_file == training_file
    assert job.hyperparameters.n_epochs == 50 and job.method.type == "supervised"
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    listed = client.fine_tuning.jobs.list(limit=5)
    assert job.id in [j.id for j in listed.data]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    events = client.fine_tuning.jobs.list_events(job.id, limit=50)
    assert events.data and all(
        e.object == "fine_tuning.job.event" and e.level in ("info", "warn", "error") for e in events.data
    )
    assert any("cancel" in e.message.lower() for e in events.data)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoints.object == "list" and isinstance(checkpoints.data, list)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_fine_tuning_errors(client: openai.OpenAI, chat_model: str, training_file: str) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        client.fine_tuning.jobs.create(model=chat_model, training_file="file-doesnotexist")
    assert missing.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as bad_epochs:
        client.fine_tuning.jobs.create(model=chat_model, training_file=training_file, hyperparameters={"n_epochs": 0})
    assert "n_epochs" in bad_epochs.value.body["param"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training_file)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
