"""What /metrics and the access log may show: no tenant in labels, keyed-hash key ids, the metrics key,
the pool's state before any request, and the `api-key` / `x-api-key` headers, against a live server."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import Settings, parse_settings
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.keys import SECRET_FILE, ApiKey, KeyRing, key_id_secret, keyed_id
from server.metrics import FINE_TUNED
from server.registry import ModelRegistry, ServedModel
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
FRESH = "fresh-chat"  # a chat model no request ever names: its pool is as it was built
METRICS_KEY = "sk-scraper"
SOLO_TENANT = ApiKey.of("sk-solo").tenant  # key-<16 hex of the bare sha256>
KEYS_FILE = "sk-acme acme\nsk-solo\n"
FT_ACME = f"ft:{CHAT}:acme:secret-suffix:abc123"
FT_SOLO = f"ft:{CHAT}:{SOLO_TENANT}:other-suffix:def456"
POOL = 32


@dataclass
class Server:
    url: str
    registry: ModelRegistry
    data_dir: Path


def _engine(base: ServedModel) -> Engine:
    engine = Engine(base.model, base.tokenizer, EngineConfig(num_blocks=POOL))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def server(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The session's models plus two tenants' fine-tuned models and a fresh chat model, each with its own engine."""
    base = registry.get(CHAT)
    own = ModelRegistry()
    own.add(base)
    own.add(registry.get(EMBED))
    engines = [_engine(base) for _ in range(3)]
    own.add(
        ServedModel(
            id=FRESH, kind="chat", path=base.path, model=base.model, tokenizer=base.tokenizer, engine=engines[0]
        )
    )
    for (name, tenant), engine in zip(((FT_ACME, "acme"), (FT_SOLO, SOLO_TENANT)), engines[1:]):
        own.add(
            ServedModel(
                id=name,
                kind="chat",
                path=base.path,
                owned_by=tenant,
                owner=tenant,
                base=base,
                model=base.model,
                tokenizer=base.tokenizer,
                engine=engine,
            )
        )
    own.mark_ready()
    data = tmp_path_factory.mktemp("privacy")
    (data / "keys.txt").write_text(KEYS_FILE)
    settings = Settings(data_dir=data, api_keys_file=data / "keys.txt", metrics_key=METRICS_KEY)
    try:
        with running_server(create_app(settings, own)) as url:
            yield Server(url, own, data)
    finally:
        for engine in engines:
            engine.shutdown()


def scrape(url: str) -> tuple[str, dict[tuple[str, frozenset], float]]:
    response = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"})
    assert response.status_code == 200, response.text
    samples = [
        (s.name, frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]
    series = [(name, labels) for name, labels, _ in samples]
    assert len(series) == len(set(series)), "a series appears twice (two engines under one label not summed)"
    return response.text, {(name, labels): v for name, labels, v in samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def chat(url: str, key: str, model: str, header: str = "authorization") -> httpx.Response:
    token = f"Bearer {key}" if header == "authorization" else key
    return httpx.post(
        url + "/v1/chat/completions",
        headers={header: token},
        timeout=120,
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )


# -- the pool's state before any request --------------------------------------------------------
def test_a_new_engine_publishes_its_pool_before_any_step(server: Server) -> None:
    stats = server.registry.get(FRESH).engine.stats()
    assert (stats.blocks_free, stats.blocks_used, stats.blocks_total) == (POOL, 0, POOL)
    _, samples = scrape(server.url)
    assert value(samples, "mlx_dropin_kv_blocks", model=FRESH, state="free") == POOL
    assert value(samples, "mlx_dropin_kv_blocks", model=FRESH, state="used") == 0


# -- no tenant in /metrics ------------------------------------------------------------------------
def test_fine_tuned_models_share_one_label_naming_no_tenant(server: Server) -> None:
    assert chat(server.url, "sk-acme", FT_ACME).status_code == 200
    assert chat(server.url, "sk-solo", FT_SOLO).status_code == 200
    assert chat(server.url, "sk-solo", CHAT).status_code == 200
    text, samples = scrape(server.url)
    for leak in ("acme", "secret-suffix", "other-suffix", "abc123", "def456", SOLO_TENANT, SOLO_TENANT[4:], "ft:"):
        assert leak not in text, leak
    assert value(samples, "mlx_dropin_time_to_first_token_seconds_count", model=FINE_TUNED) == 2
    assert value(samples, "mlx_dropin_time_to_first_token_seconds_count", model=CHAT) == 1  # the operator's id
    assert value(samples, "mlx_dropin_generated_tokens_total", model=FINE_TUNED) == 4
    assert value(samples, "mlx_dropin_engine_generated_tokens_total", model=FINE_TUNED) == 4
    # both adapters' pools under one label, summed
    blocks = sum(value(samples, "mlx_dropin_kv_blocks", model=FINE_TUNED, state=s) for s in ("used", "free"))
    assert blocks == 2 * POOL
    assert value(samples, "mlx_dropin_prompt_tokens_total", model=FINE_TUNED, source="computed") > 0


def test_fine_tuned_counters_stay_monotonic_when_an_adapter_is_unloaded(server: Server) -> None:
    _, before = scrape(server.url)
    generated = value(before, "mlx_dropin_engine_generated_tokens_total", model=FINE_TUNED)
    computed = value(before, "mlx_dropin_prompt_tokens_total", model=FINE_TUNED, source="computed")
    assert generated and computed
    served = server.registry.get(FT_ACME)
    engine, served.engine = served.engine, None  # as the adapter cache unloads an idle model
    try:
        _, after = scrape(server.url)
    finally:
        served.engine = engine
    assert value(after, "mlx_dropin_engine_generated_tokens_total", model=FINE_TUNED) == generated
    assert value(after, "mlx_dropin_prompt_tokens_total", model=FINE_TUNED, source="computed") == computed
    assert sum(value(after, "mlx_dropin_kv_blocks", model=FINE_TUNED, state=s) for s in ("used", "free")) == POOL


# -- the metrics key ------------------------------------------------------------------------------
def test_metrics_needs_the_metrics_key_and_no_api_key_opens_it(server: Server) -> None:
    for headers in (
        {},
        {"authorization": "Bearer sk-acme"},
        {"x-api-key": "sk-solo"},
        {"authorization": "Bearer nope"},
    ):
        refused = httpx.get(server.url + "/metrics", headers=headers)
        assert refused.status_code == 401, headers
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
        assert "metrics key" in error["message"]
    for header, token in (
        ("authorization", f"Bearer {METRICS_KEY}"),
        ("api-key", METRICS_KEY),
        ("x-api-key", METRICS_KEY),
    ):
        assert httpx.get(server.url + "/metrics", headers={header: token}).status_code == 200, header
    # the metrics key is no API key
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {METRICS_KEY}"}).status_code == 401


def test_metrics_stays_open_without_a_metrics_key(registry: ModelRegistry, tmp_path: Path) -> None:
    with running_server(create_app(Settings(data_dir=tmp_path, api_keys=("sk-x",)), registry)) as url:
        assert httpx.get(url + "/metrics").status_code == 200


def test_metrics_key_flag_and_environment() -> None:
    assert parse_settings(["--metrics-key", "m1"], {}).metrics_key == "m1"
    assert parse_settings([], {"MLX_DROPIN_METRICS_KEY": "m2"}).metrics_key == "m2"
    assert parse_settings([], {}).metrics_key is None
    with pytest.raises(ValueError, match="metrics key"):
        parse_settings(["--metrics-key", "a b"], {})


# -- api-key and x-api-key ------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["api-key", "x-api-key", "API-Key", "X-Api-Key"])
def test_api_key_headers_authenticate(server: Server, header: str) -> None:
    assert httpx.get(server.url + "/v1/models", headers={header: "sk-acme"}).status_code == 200
    wrong = httpx.get(server.url + "/v1/models", headers={header: "sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect API key provided."


def test_api_key_header_picks_the_tenant(server: Server) -> None:
    """The key from x-api-key is the caller: its org's fine-tuned model is listed, another org's is not."""
    acme = httpx.get(server.url + "/v1/models", headers={"x-api-key": "sk-acme"}).json()
    solo = httpx.get(server.url + "/v1/models", headers={"api-key": "sk-solo"}).json()
    assert FT_ACME in [m["id"] for m in acme["data"]] and FT_SOLO not in [m["id"] for m in acme["data"]]
    assert FT_SOLO in [m["id"] for m in solo["data"]] and FT_ACME not in [m["id"] for m in solo["data"]]
    assert chat(server.url, "sk-acme", FT_ACME, header="api-key").status_code == 200


def test_with_several_keys_the_bearer_one_decides(server: Server) -> None:
    def models(**headers: str) -> httpx.Response:
        return httpx.get(server.url + "/v1/models", headers={k.replace("_", "-"): v for k, v in headers.items()})

    assert models(authorization="Bearer sk-acme", x_api_key="sk-wrong").status_code == 200
    assert models(authorization="Bearer sk-wrong", x_api_key="sk-acme").status_code == 401
    assert models(authorization="Bearer sk-wrong", api_key="sk-acme").status_code == 401
    assert models(api_key="sk-wrong", x_api_key="sk-acme").status_code == 401  # api-key before x-api-key
    # a Bearer key wins over another tenant's key elsewhere: acme's model list, not solo's
    listed = [m["id"] for m in models(authorization="Bearer sk-acme", api_key="sk-solo").json()["data"]]
    assert FT_ACME in listed and FT_SOLO not in listed
    # an Authorization header that is not Bearer carries no key: the next header is read
    assert models(authorization="Basic Zm9vOmJhcg==", x_api_key="sk-acme").status_code == 200
    missing = models(authorization="Basic Zm9vOmJhcg==")
    assert missing.status_code == 401 and "didn't provide" in missing.json()["error"]["message"]


# -- key ids in logs ------------------------------------------------------------------------------
def test_access_log_shows_keyed_hash_ids_only(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mlx_dropin.access")
    solo = {"authorization": "Bearer sk-solo"}
    httpx.get(server.url + "/v1/models", headers={**solo, "x-request-id": "req-kid-1"})
    httpx.get(server.url + f"/v1/models/{FT_SOLO}", headers={**solo, "x-request-id": "req-kid-2"})
    httpx.post(
        server.url + "/v1/chat/completions",
        headers={**solo, "x-request-id": "req-kid-3"},
        timeout=120,
        json={"model": FT_SOLO, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    )
    deadline = time.monotonic() + 5
    while True:  # a line is written once its response has gone
        lines = {
            e["request_id"]: e
            for e in (json.loads(r.getMessage()) for r in caplog.records if r.name == "mlx_dropin.access")
        }
        if {"req-kid-1", "req-kid-2", "req-kid-3"} <= set(lines) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    secret = bytes.fromhex((server.data_dir / SECRET_FILE).read_text().strip())
    bare = "key-" + hashlib.sha256(b"sk-solo").hexdigest()[:16]
    expected = "key-" + hmac.new(secret, b"sk-solo", hashlib.sha256).hexdigest()[:16]
    assert expected == keyed_id(secret, "sk-solo") != bare
    for request_id in ("req-kid-1", "req-kid-2", "req-kid-3"):
        line = lines[request_id]
        assert line["key"] == line["tenant"] == expected and line["status"] == 200, line
        assert bare not in json.dumps(line), line
    # the fine-tuned model's id and path name the tenant by its log id too
    assert lines["req-kid-2"]["path"] == "/v1/models/" + FT_SOLO.replace(bare, expected)
    assert lines["req-kid-3"]["model"] == FT_SOLO.replace(bare, expected)
    # the storage scope is unchanged: what the key stored before stays reachable
    assert server.registry.get(FT_SOLO, bare).owner == bare == SOLO_TENANT


def test_key_ids_are_stable_per_data_dir_and_differ_between_them(registry: ModelRegistry, tmp_path: Path) -> None:
    def log_id(data_dir: Path) -> str:
        app = create_app(Settings(data_dir=data_dir, api_keys=("sk-same",)), registry)
        key = app.state.keys.lookup("sk-same")
        app.state.database.close()
        assert key.tenant == "key-" + hashlib.sha256(b"sk-same").hexdigest()[:16]
        return key.log_id

    first = log_id(tmp_path / "a")
    assert log_id(tmp_path / "a") == first != log_id(tmp_path / "b")
    assert first.startswith("key-") and len(first) == 20 and first != ApiKey.of("sk-same").id
    mode = stat.S_IMODE((tmp_path / "a" / SECRET_FILE).stat().st_mode)
    assert mode == 0o600
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(f".{SECRET_FILE}")]  # no temp left


def test_a_bad_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("not hex\n")
    with pytest.raises(ValueError, match="key-id secret"):
        key_id_secret(tmp_path)
    (tmp_path / SECRET_FILE).write_text("abcd\n")
    with pytest.raises(ValueError, match="too short"):
        key_id_secret(tmp_path)


def test_a_ring_without_a_data_dir_still_hides_the_bare_hash() -> None:
    key = KeyRing([("sk-k", ApiKey.of("sk-k"))]).lookup("sk-k")
    assert key.log_id.startswith("key-") and key.log_id != key.id
