"""`/v1/files` through the openai SDK and raw HTTP: upload, list with pagination, retrieve, content,
delete, the size limit, tenancy, and concurrent uploads."""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.models.registry import ModelRegistry
from tests.serving import running_server

KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), api_keys=KEYS, max_file_mb=0.5)
    with running_server(create_app(settings, registry)) as url:
        yield url


def sdk(base: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_upload_retrieve_content_delete(base: str) -> None:
    client = sdk(base)
    data = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    created = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(data), "train.jsonl",
                                                                                   "fine-tune", "processed")
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    assert client.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)


def test_pagination(base: str) -> None:
    client = sdk(base, KEYS[1])
    ids = [client.files.create(file=(f"f{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(5)]
    page = client.files.list(limit=2, order="asc", purpose="batch")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    every = [f.id for f in client.files.list(limit=2, order="asc", purpose="batch")]  # the SDK follows `after`
    assert every == ids
    newest = client.files.list(limit=3, purpose="batch")
    assert [f.id for f in newest.data] == ids[::-1][:3]
    raw = httpx.get(base + "/v1/files", params={"limit": 2, "order": "asc", "purpose": "batch", "after": ids[1]},
                    headers={"authorization": f"Bearer {KEYS[1]}"}).json()
    assert [f["id"] for f in raw["data"]] == ids[2:4] and raw["first_id"] == ids[2] and raw["last_id"] == ids[3]


def test_tenants_never_see_each_others_files(base: str) -> None:
    mine = sdk(base, KEYS[0]).files.create(file=("secret.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    other = sdk(base, KEYS[1])
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert mine.id not in [f.id for f in other.files.list()]


@pytest.mark.parametrize(("fields", "param"), [({"purpose": "fine-tune"}, "file"), ({}, "purpose"),
                                               ({"purpose": "nonsense"}, "purpose")])
def test_bad_uploads_are_400(base: str, fields: dict, param: str) -> None:
    files = {"file": ("a.jsonl", b"{}\n")} if param != "file" else {"other": ("a.jsonl", b"{}\n")}
    r = httpx.post(base + "/v1/files", data=fields, files=files, headers={"authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_json_body_is_400(base: str) -> None:
    r = httpx.post(base + "/v1/files", json={"purpose": "fine-tune"}, headers={"authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_too_large_is_413_and_leaves_nothing(base: str, tmp_path: Path) -> None:
    client = sdk(base)
    before = {f.id for f in client.files.list()}
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 700_000)), purpose="fine-tune")
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    assert {f.id for f in client.files.list()} == before


def test_concurrent_uploads_lose_nothing(base: str) -> None:
    client = sdk(base)
    payloads = [f'{{"n": {i}}}\n'.encode() * (i + 1) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda p: client.files.create(file=("c.jsonl", io.BytesIO(p)), purpose="user_data"),
                                payloads))
    assert len({f.id for f in created}) == 16
    for f, p in zip(created, payloads):
        assert client.files.content(f.id).content == p
