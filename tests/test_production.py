"""Production behaviour: keys with organizations as tenants, per-key rate limits and concurrency, the
request timeout, CORS and the limits' errors, through the `openai` SDK and raw HTTP against live servers."""

from __future__ import annotations

import io
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings, parse_settings
from server.keys import ApiKey, KeyRing, read_keys_file
from server.rate_limits import Bucket, go_duration
from server.registry import ModelRegistry, ServedModel
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
KEYS_FILE = """\
# acme's two keys share a tenant; globex is another; sk-solo has no org
sk-acme-1   acme
sk-acme-2   acme     rpm=1000
sk-globex   globex   tpm=100000 max_concurrent=8
sk-solo
"""
RESET = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def sdk(base: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=retries, timeout=120)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- keys, durations, buckets, flags (no server) -------------------------------------------------
def test_keys_file_lines_give_orgs_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(KEYS_FILE)
    ring = KeyRing.from_settings(["sk-flag"], path)
    assert len(ring) == 5 and ring.lookup("nope") is None and ring.lookup("") is None
    one, two, globex = ring.lookup("sk-acme-1"), ring.lookup("sk-acme-2"), ring.lookup("sk-globex")
    assert one.tenant == two.tenant == "acme" and one.id != two.id and two.rpm == 1000
    assert (globex.tenant, globex.tpm, globex.max_concurrent) == ("globex", 100000, 8)
    # a key without an org keeps the tenant it had before orgs existed (its stored data stays reachable)
    assert ring.lookup("sk-solo").tenant == ApiKey.of("sk-solo").tenant
    assert ring.lookup("sk-solo").tenant.startswith("key-") and ring.lookup("sk-flag").organization is None


def test_keys_file_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "k1", "organization": "acme", "tpm": 50}, {"key": "k2"}]}))
    (k1, a1), (k2, a2) = read_keys_file(path)
    assert (k1, a1.tenant, a1.tpm, k2, a2.organization) == ("k1", "acme", 50, "k2", None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("k1 acme rpm=x\n", "line 1"),
        ("k1\nk2 acme bogus=3\n", "line 2"),
        ("k1 public\n", "organization"),
        ("k1 a:b\n", "organization"),
        ("k1 acme rpm=0\n", "positive"),
        ("# nothing\n", "no keys"),
        ('{"keys": [{"key": "k", "org": "x"}]}', "unknown fields"),
        ("k1 acme\nk2\nk1 globex\n", "line 3: repeats the key of line 1"),
        ("k1 acme\nk1 acme\n", "line 2: repeats the key of line 1"),  # even an identical repeat is a mistake
        ('{"keys": [{"key": "k"}, {"key": "j"}, {"key": "k"}]}', r"keys\[2\] repeats the key of keys\[0\]"),
        ("k1\nk2 acme rpm=abc\n", "line 2: rpm must be a positive integer, got 'abc'"),
        ("k1 tpm=1.5\n", "line 1: tpm must be a positive integer, got '1.5'"),
        ("k1 acme rpm=2 rpm=3\n", "line 1: rpm is given twice"),
    ],
)
def test_bad_keys_files_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        KeyRing.from_settings([], path)


def test_missing_keys_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        create_app(Settings(data_dir=tmp_path, api_keys_file=tmp_path / "absent"))


def test_go_durations_like_openai_headers() -> None:
    assert [go_duration(s) for s in (0.02, 0.9994, 1, 1.5, 17.34, 360, 3723)] == [
        "20ms",
        "1s",
        "1s",
        "1.5s",
        "17.34s",
        "6m0s",
        "1h2m3s",
    ]


def test_bucket_refills_continuously() -> None:
    bucket = Bucket(limit=60, window=60.0)
    assert bucket.wait_for(60, now=100.0) == 0
    bucket.take(60, now=100.0)
    assert bucket.wait_for(1, now=100.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=100.5) == pytest.approx(0.5)
    assert bucket.wait_for(61, now=100.0) == math.inf
    assert dict(bucket.headers("requests", now=130.0))["x-ratelimit-reset-requests"] == "30s"


def test_production_flags_and_environment() -> None:
    settings = parse_settings(
        ["--rate-limit-rpm", "60", "--cors-origin", "http://a", "--cors-origin", "*", "--max-concurrent-per-key", "4"],
        {
            "MLX_DROPIN_RATE_LIMIT_TPM": "1000",
            "MLX_DROPIN_REQUEST_TIMEOUT": "30",
            "MLX_DROPIN_API_KEYS_FILE": "/etc/keys",
        },
    )
    assert (settings.rate_limit_rpm, settings.rate_limit_tpm, settings.max_concurrent_per_key) == (60, 1000, 4)
    assert settings.request_timeout == 30.0 and settings.cors_origins == ("http://a", "*")
    assert settings.api_keys_file == Path("/etc/keys") and settings.auth_enabled
    off = parse_settings([], {})
    assert off.rate_limit_rpm is off.rate_limit_tpm is off.request_timeout is None and not off.cors_origins
    assert parse_settings([], {"MLX_DROPIN_CORS_ORIGINS": "http://a,http://b"}).cors_origins == ("http://a", "http://b")
    with pytest.raises(ValueError):
        parse_settings(["--rate-limit-rpm", "0"], {})


# -- organizations as tenants --------------------------------------------------------------------
@pytest.fixture(scope="module")
def org_server(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("orgs")
    (data / "keys.txt").write_text(KEYS_FILE)
    with running_server(create_app(Settings(data_dir=data, api_keys_file=data / "keys.txt"), registry)) as url:
        yield url


def test_keys_of_one_org_share_files_others_never(org_server: str) -> None:
    created = sdk(org_server, "sk-acme-1").files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="user_data")
    mate = sdk(org_server, "sk-acme-2")
    assert mate.files.retrieve(created.id).id == created.id and mate.files.content(created.id).content == b"{}\n"
    assert created.id in [f.id for f in mate.files.list()]
    for stranger in ("sk-globex", "sk-solo"):
        with pytest.raises(openai.NotFoundError):
            sdk(org_server, stranger).files.retrieve(created.id)
        assert created.id not in [f.id for f in sdk(org_server, stranger).files.list()]
    assert httpx.get(org_server + "/v1/models", headers=auth("sk-unknown")).status_code == 401


def test_keys_of_one_org_share_fine_tuning_jobs(org_server: str) -> None:
    training = sdk(org_server, "sk-acme-1").files.create(
        file=("bad.jsonl", io.BytesIO(b"not json\n")), purpose="fine-tune"
    )
    job = sdk(org_server, "sk-acme-2").fine_tuning.jobs.create(model=CHAT, training_file=training.id)
    assert job.organization_id == "acme"
    assert sdk(org_server, "sk-acme-1").fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in sdk(org_server, "sk-acme-1").fine_tuning.jobs.list()]
    globex = sdk(org_server, "sk-globex")
    with pytest.raises(openai.NotFoundError):
        globex.fine_tuning.jobs.retrieve(job.id)
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list()]
    with pytest.raises(openai.BadRequestError):  # another org's file cannot be trained on
        globex.fine_tuning.jobs.create(model=CHAT, training_file=training.id)


def test_fine_tuned_models_are_visible_to_their_whole_org(org_server: str, registry: ModelRegistry) -> None:
    base = registry.get(CHAT)
    name = f"ft:{CHAT}:acme:probe:{uuid.uuid4().hex[:8]}"
    registry.add(ServedModel(id=name, kind="chat", path=base.path, owned_by="acme", owner="acme", base=base))
    try:
        for key in ("sk-acme-1", "sk-acme-2"):
            assert name in [m.id for m in sdk(org_server, key).models.list()]
        for key in ("sk-globex", "sk-solo"):
            assert name not in [m.id for m in sdk(org_server, key).models.list()]
            with pytest.raises(openai.NotFoundError):
                sdk(org_server, key).models.retrieve(name)
    finally:
        registry.remove(name)


def test_stored_responses_belong_to_the_org(org_server: str) -> None:
    created = sdk(org_server, "sk-acme-1").responses.create(model=CHAT, input="Say hi.", max_output_tokens=2)
    assert sdk(org_server, "sk-acme-2").responses.retrieve(created.id).id == created.id
    with pytest.raises(openai.NotFoundError):
        sdk(org_server, "sk-globex").responses.retrieve(created.id)


def test_a_guessed_conversation_id_reuses_kv_only_within_the_org(org_server: str) -> None:
    marker = uuid.uuid4().hex
    messages = [
        {"role": "system", "content": f"{marker}: answer briefly."},  # a first block no one has
        {"role": "user", "content": "List three colours of the rainbow, one per line, and nothing else."},
    ]

    def cached(key: str) -> int:
        r = sdk(org_server, key).chat.completions.create(
            model=CHAT, messages=messages, max_tokens=1, prompt_cache_key="conv-1", temperature=0
        )
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("sk-acme-1") == 0
    assert cached("sk-globex") == 0  # same prompt, same conversation id, another org: nothing reused
    assert cached("sk-solo") == 0
    assert cached("sk-acme-2") > 16  # the same org finds the conversation


# -- rate limits -----------------------------------------------------------------------------------
def test_rpm_429_is_openai_shaped_and_the_sdk_retry_honours_it(registry: ModelRegistry, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=("sk-r",), rate_limit_rpm=2, rate_limit_window=2.0)
    app = create_app(settings, registry)
    with running_server(app) as url:
        first = httpx.get(url + "/v1/models", headers=auth("sk-r"))
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert RESET.match(first.headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in first.headers  # tpm is off
        httpx.get(url + "/v1/models", headers=auth("sk-r"))
        with pytest.raises(openai.RateLimitError) as info:
            sdk(url, "sk-r").models.list()
        response = info.value.response
        assert info.value.body == {
            "message": info.value.body["message"],
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        assert int(response.headers["retry-after"]) >= 1 and 0 < int(response.headers["retry-after-ms"]) <= 1000
        assert response.headers["x-ratelimit-remaining-requests"] == "0" and response.headers["x-request-id"]

        def limited() -> float:
            return (
                app.state.metrics.registry.get_sample_value(
                    "mlx_dropin_requests_total", {"route": "/v1/models", "method": "GET", "status": "429"}
                )
                or 0
            )

        time.sleep(1.1)  # one request back: use it, so the retrying client meets a 429 first
        httpx.get(url + "/v1/models", headers=auth("sk-r"))
        before, started = limited(), time.monotonic()
        assert CHAT in [m.id for m in sdk(url, "sk-r", retries=2).models.list()]
        assert limited() == before + 1 and time.monotonic() - started > 0.3


def test_per_key_override_limits_one_key_only(org_server: str) -> None:
    limited = httpx.get(org_server + "/v1/models", headers=auth("sk-acme-2"))
    assert limited.headers["x-ratelimit-limit-requests"] == "1000"
    assert "x-ratelimit-limit-requests" not in httpx.get(org_server + "/v1/models", headers=auth("sk-acme-1")).headers
    assert (
        httpx.get(org_server + "/v1/models", headers=auth("sk-globex")).headers["x-ratelimit-limit-tokens"] == "100000"
    )


def test_tpm_counts_prompt_and_max_tokens_at_admission(registry: ModelRegistry, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=("sk-t",), rate_limit_tpm=200, rate_limit_window=3600.0)
    with running_server(create_app(settings, registry)) as url:
        client = sdk(url, "sk-t")
        messages = [{"role": "user", "content": "Hi"}]
        raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=messages, max_tokens=1)
        charged = raw.parse().usage.prompt_tokens + 1
        remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
        assert raw.headers["x-ratelimit-limit-tokens"] == "200" and remaining in (200 - charged, 201 - charged)
        assert RESET.match(raw.headers["x-ratelimit-reset-tokens"])
        with pytest.raises(openai.RateLimitError) as info:  # fits the limit, not what is left of it
            client.chat.completions.create(model=CHAT, messages=messages, max_tokens=remaining - charged + 20)
        assert info.value.body["type"] == "tokens" and info.value.code == "rate_limit_exceeded"
        assert int(info.value.response.headers["retry-after"]) > 1
        with pytest.raises(openai.RateLimitError) as info:  # more than the whole limit: never retried
            client.chat.completions.create(model=CHAT, messages=messages, max_tokens=500)
        assert "Request too large" in info.value.message
        assert info.value.response.headers["x-should-retry"] == "false"
        embedded = httpx.post(url + "/v1/embeddings", headers=auth("sk-t"), json={"input": "hello world"})
        assert embedded.status_code == 200
        assert int(embedded.headers["x-ratelimit-remaining-tokens"]) < remaining


def test_concurrent_sequences_per_key(registry: ModelRegistry, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=("sk-c", "sk-d"), max_concurrent_per_key=1)
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    body = {"model": CHAT, "messages": messages, "max_tokens": 8, "stream": True}
    app = create_app(settings, registry)
    limits, key = app.state.limits, app.state.keys.lookup("sk-c")

    def running() -> int:
        return limits._state(key).running

    def wait_released() -> None:
        """The held sequences are released once the response is sent, which the client may see first."""
        deadline = time.monotonic() + 5
        while running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running() == 0

    with running_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth("sk-c"), timeout=60) as s:
            lines = s.iter_lines()
            next(lines)
            assert running() == 1  # held from admission until the stream's last byte
            assert [line for line in lines if line][-1] == "data: [DONE]"
        wait_released()
        limits.admit(key, 0, 1)  # a sequence of this key is running
        try:
            refused = httpx.post(
                url + "/v1/chat/completions", headers=auth("sk-c"), json={**body, "stream": False, "max_tokens": 1}
            )
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert "concurrent" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
            other_key = sdk(url, "sk-d").chat.completions.create(model=CHAT, messages=messages, max_tokens=1)
            assert other_key.choices[0].finish_reason == "length"
        finally:
            limits.release(key, 1)
        again = sdk(url, "sk-c").chat.completions.create(model=CHAT, messages=messages, max_tokens=1)
        assert again.choices[0].finish_reason == "length"
        wait_released()
        with pytest.raises(openai.RateLimitError) as info:  # n=2 can never fit a limit of 1
            sdk(url, "sk-c").chat.completions.create(model=CHAT, messages=messages, max_tokens=1, n=2)
        assert info.value.response.headers["x-should-retry"] == "false"


# -- timeout, CORS, limits with clear errors -------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("strict"),
        api_keys=("sk-s",),
        request_timeout=0.05,
        cors_origins=("http://app.example",),
    )
    with running_server(create_app(settings, registry)) as url:
        yield url


def test_request_timeout_is_504_and_aborts_the_generation(strict_server: str, registry: ModelRegistry) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        sdk(strict_server, "sk-s", retries=2).chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Count to fifty."}], max_tokens=8
        )
    assert info.value.status_code == 504 and info.value.code == "timeout"
    assert info.value.body["type"] == "server_error" and "--request-timeout" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    engine = registry.get(CHAT).engine
    deadline = time.monotonic() + 10
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().running == 0


def test_cors_preflight_and_exposed_headers(strict_server: str, org_server: str) -> None:
    preflight = httpx.options(
        strict_server + "/v1/chat/completions",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    got = httpx.get(strict_server + "/v1/models", headers={"origin": "http://app.example", **auth("sk-s")})
    assert got.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-request-id" in got.headers["access-control-expose-headers"]
    refused = httpx.get(strict_server + "/v1/models", headers={"origin": "http://evil.example", **auth("sk-s")})
    assert "access-control-allow-origin" not in refused.headers
    off = httpx.get(org_server + "/v1/models", headers={"origin": "http://app.example", **auth("sk-solo")})
    assert "access-control-allow-origin" not in off.headers  # CORS is off unless asked for


def test_limits_have_clear_errors(org_server: str) -> None:
    client = sdk(org_server, "sk-solo")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert info.value.code == "context_length_exceeded" and "context_length_exceeded" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="all-minilm-l6-v2", input=["x"] * 2049)
    assert info.value.param == "input" and "2048" in info.value.message
