"""`GET /metrics` (Prometheus text, per-app registry) and the JSON access log, against a live server."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
KEY = "sk-metrics"
MLX_KINDS = ("active", "cache", "peak", "limit")


@pytest.fixture(scope="module")
def base(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics"), api_keys=(KEY,))
    with running_server(create_app(settings, registry)) as url:
        yield url


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(base + "/metrics")  # no key needed, like /health
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_generation_embeddings_and_errors_show_in_metrics(base: str) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Say hello."}]
    client.chat.completions.create(model=CHAT, messages=messages, max_tokens=3)
    for _ in client.chat.completions.create(model=CHAT, messages=messages, max_tokens=3, stream=True):
        pass
    client.embeddings.create(model=EMBED, input=["one", "two"])
    httpx.get(base + "/v1/no-such-route", headers={"authorization": f"Bearer {KEY}"})
    httpx.get(base + "/v1/files/file-nope", headers={"authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 5
    while True:  # a request is counted once its response has gone, which may trail the client's read
        samples = scrape(base)
        done = (
            "mlx_dropin_requests_total",
            frozenset({"route": "/v1/files/{file_id}", "method": "GET", "status": "404"}.items()),
        )
        if done in samples or time.monotonic() > deadline:
            break
        time.sleep(0.02)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(samples, "mlx_dropin_requests_total", **chat, status="200") == 2
    assert value(samples, "mlx_dropin_request_duration_seconds_count", **chat) == 2
    assert value(samples, "mlx_dropin_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(samples, "mlx_dropin_requests_total", route="/v1/files/{file_id}", method="GET", status="404") == 1
    assert value(samples, "mlx_dropin_time_to_first_token_seconds_count", model=CHAT) == 2
    generated = value(samples, "mlx_dropin_generated_tokens_total", model=CHAT)
    assert 2 <= generated <= 6
    assert value(samples, "mlx_dropin_inter_token_latency_seconds_count", model=CHAT) == generated - 2

    # read from the engine, the batcher and the job store at scrape time
    blocks = {
        state: value(samples, "mlx_dropin_kv_blocks", model=CHAT, state=state)
        for state in ("used", "cached", "free", "pinned")
    }
    assert blocks["free"] > 0 and blocks["used"] + blocks["free"] > 0
    assert ("mlx_dropin_sequences", frozenset({"model": CHAT, "state": "running"}.items())) in samples
    assert ("mlx_dropin_queue_depth", frozenset({"model": CHAT}.items())) in samples
    assert 0 <= value(samples, "mlx_dropin_prefix_reuse_ratio", model=CHAT) <= 1
    assert value(samples, "mlx_dropin_prompt_tokens_total", model=CHAT, source="computed") > 0
    assert value(samples, "mlx_dropin_embedding_batches_total", model=EMBED) >= 1
    assert value(samples, "mlx_dropin_embedding_inputs_total", model=EMBED) >= 2
    assert ("mlx_dropin_fine_tuning_jobs", frozenset({"status": "running"}.items())) in samples
    assert value(samples, "mlx_dropin_requests_in_flight") == 1  # the scrape itself


def test_each_app_has_its_own_registry(registry: ModelRegistry, tmp_path: Path) -> None:
    first = create_app(Settings(data_dir=tmp_path / "a"), registry)
    second = create_app(Settings(data_dir=tmp_path / "b"), registry)
    first.state.metrics.observe_request("/health", "GET", 200, 0.01)
    assert first.state.metrics.registry is not second.state.metrics.registry
    labels = {"route": "/health", "method": "GET", "status": "200"}
    assert first.state.metrics.registry.get_sample_value("mlx_dropin_requests_total", labels) == 1
    assert second.state.metrics.registry.get_sample_value("mlx_dropin_requests_total", labels) is None


def test_one_json_access_line_per_request(base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mlx_dropin.access")
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": "req-access-1"}
    httpx.post(base + "/v1/embeddings", headers=headers, json={"model": EMBED, "input": "hi"})
    httpx.get(base + "/v1/models", headers={"x-request-id": "req-access-2"})  # no key: 401
    deadline = time.monotonic() + 5
    while True:  # a line is written once the response has gone, so it may trail the client's read a little
        lines = {
            entry["request_id"]: entry
            for entry in (json.loads(r.getMessage()) for r in caplog.records if r.name == "mlx_dropin.access")
        }
        if {"req-access-1", "req-access-2"} <= set(lines) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    ok, refused = lines["req-access-1"], lines["req-access-2"]
    assert (ok["method"], ok["path"], ok["status"], ok["model"]) == ("POST", "/v1/embeddings", 200, EMBED)
    assert ok["tenant"].startswith("key-") and ok["duration_ms"] > 0 and ok["time"].endswith("+00:00")
    assert (refused["status"], refused["tenant"], refused["model"]) == (401, None, None)


def test_mlx_memory_is_sampled_at_scrape_time(base: str) -> None:
    first = scrape(base)
    active, cache, peak, limit = (
        value(first, "mlx_dropin_mlx_memory_bytes", process="server", kind=k) for k in MLX_KINDS
    )
    assert active > 0 and peak >= active and cache >= 0 and limit > 0  # the loaded weights and KV pools are active
    held = mx.zeros((1 << 22,), dtype=mx.float32)  # 16 MiB more, alive while the next scrape reads
    mx.eval(held)
    second = scrape(base)
    assert value(second, "mlx_dropin_mlx_memory_bytes", process="server", kind="active") >= active + (1 << 24) - (
        1 << 20
    )
    del held
