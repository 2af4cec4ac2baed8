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
from server.registry import ModelRegistry
from tests.serving import running_server

KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory, database_url: str | None) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"), api_keys=KEYS, max_file_mb=0.5, database_url=database_url
    )
    with running_server(create_app(settings, registry)) as url:
        yield url


def sdk(base: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_upload_retrieve_content_delete(base: str) -> None:
    client = sdk(base)
    data = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    created = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(data),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
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
    raw = httpx.get(
        base + "/v1/files",
        params={"limit": 2, "order": "asc", "purpose": "batch", "after": ids[1]},
        headers={"authorization": f"Bearer {KEYS[1]}"},
    ).json()
    assert [f["id"] for f in raw["data"]] == ids[2:4] and raw["first_id"] == ids[2] and raw["last_id"] == ids[3]


def test_tenants_never_see_each_others_files(base: str) -> None:
    mine = sdk(base, KEYS[0]).files.create(file=("secret.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    other = sdk(base, KEYS[1])
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert mine.id not in [f.id for f in other.files.list()]


@pytest.mark.parametrize(
    ("fields", "param"), [({"purpose": "fine-tune"}, "file"), ({}, "purpose"), ({"purpose": "nonsense"}, "purpose")]
)
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
        created = list(
            pool.map(lambda p: client.files.create(file=("c.jsonl", io.BytesIO(p)), purpose="user_data"), payloads)
        )
    assert len({f.id for f in created}) == 16
    for f, p in zip(created, payloads):
        assert client.files.content(f.id).content == p


# -- per-tenant storage quota (--max-storage-gb-per-tenant) ------------------------------------------

QUOTA_KEYS = "sk-acme-1 acme\nsk-acme-2 acme\nsk-globex globex\n"
QUOTA_BYTES = 10_000


@pytest.fixture(scope="module")
def quota_server(
    registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory, database_url: str | None
) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("quota")
    (data / "keys.txt").write_text(QUOTA_KEYS)
    settings = Settings(
        data_dir=data,
        api_keys_file=data / "keys.txt",
        max_storage_gb_per_tenant=QUOTA_BYTES / 1024**3,
        database_url=database_url,
    )
    with running_server(create_app(settings, registry)) as url:
        yield url, data / "files"


def test_quota_refuses_an_upload_over_it_per_tenant(quota_server: tuple[str, Path]) -> None:
    url, files_dir = quota_server
    acme, acme_mate, globex = sdk(url, "sk-acme-1"), sdk(url, "sk-acme-2"), sdk(url, "sk-globex")
    kept = acme.files.create(file=("a.jsonl", io.BytesIO(b"a" * 6_000)), purpose="fine-tune")
    on_disk = sorted(p.name for p in files_dir.iterdir())
    with pytest.raises(openai.BadRequestError) as err:  # 6,000 + 5,000 > 10,000, from the other key of acme
        acme_mate.files.create(file=("b.jsonl", io.BytesIO(b"b" * 5_000)), purpose="fine-tune")
    body = err.value.body
    assert body["code"] == "storage_quota_exceeded" and body["param"] == "file"
    assert "--max-storage-gb-per-tenant" in body["message"] and "6000 bytes" in body["message"]
    assert [f.id for f in acme.files.list()] == [kept.id]
    assert sorted(p.name for p in files_dir.iterdir()) == on_disk  # no orphan bytes
    # another org has its own quota; acme still fits what is left
    assert globex.files.create(file=("g.jsonl", io.BytesIO(b"g" * 9_000)), purpose="fine-tune").bytes == 9_000
    assert acme_mate.files.create(file=("c.jsonl", io.BytesIO(b"c" * 4_000)), purpose="fine-tune").bytes == 4_000
    with pytest.raises(openai.BadRequestError):  # exactly full now: even one byte more is refused
        acme.files.create(file=("d.jsonl", io.BytesIO(b"d")), purpose="fine-tune")
    acme.files.delete(kept.id)  # deleting frees room
    assert acme.files.create(file=("e.jsonl", io.BytesIO(b"e" * 6_000)), purpose="fine-tune").bytes == 6_000


def test_concurrent_uploads_never_exceed_the_quota(quota_server: tuple[str, Path]) -> None:
    url, _ = quota_server
    client = sdk(url, "sk-globex")
    for f in client.files.list():
        client.files.delete(f.id)

    def upload(i: int) -> int:
        try:
            client.files.create(file=(f"{i}.jsonl", io.BytesIO(b"x" * 3_000)), purpose="user_data")
            return 1
        except openai.BadRequestError as exc:
            assert exc.body["code"] == "storage_quota_exceeded"
            return 0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(upload, range(8)))
    assert accepted == 3 and sum(f.bytes for f in client.files.list()) == 9_000


def test_quota_flag_and_env() -> None:
    from server.config import parse_settings

    assert parse_settings([]).max_storage_bytes_per_tenant is None
    assert parse_settings(["--max-storage-gb-per-tenant", "2"]).max_storage_bytes_per_tenant == 2 * 1024**3
    env = {"MLX_DROPIN_MAX_STORAGE_GB_PER_TENANT": "0.5"}
    assert parse_settings([], env).max_storage_gb_per_tenant == 0.5
    with pytest.raises(ValueError):
        Settings(max_storage_gb_per_tenant=0)
