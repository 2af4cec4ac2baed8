"""Abandoned requests stop: a client that disconnects, JSON or SSE, while its prompt prefills or while it
decodes, gets its sequences aborted within a few engine steps, its KV blocks freed and its key's concurrency
slot back, for chat, completions and responses alike. Against the real app on hypercorn, over raw sockets.

Chat and completions ban the EOS token (logit_bias), so nothing but an abort can end them before
max_tokens; a responses request has no logit_bias, so its answer is a JSON schema the model cannot finish
within max_output_tokens (a string of at least 20,000 characters)."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.engine.engine import Engine, EngineStats
from server.keys import ApiKey
from server.metrics import Metrics
from server.model_lifecycle import load, shutdown
from server.rate_limits import RateLimits
from server.registry import ModelRegistry, ServedModel
from tests.serving import running_server

CHAT = "smollm2-135m-instruct"
KEY = "sk-disconnect"
MAX_TOKENS = 1000  # far more than can decode before the test's deadlines, even on a fast machine
ABORT_DEADLINE = 30.0  # seconds for the abort to land: one engine step, however loaded the machine is
ENDLESS = {
    "type": "json_schema",
    "name": "endless",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 20000}},
        "required": ["text"],
        "additionalProperties": False,
    },
}


@dataclass
class Server:
    url: str
    engine: Engine
    limits: RateLimits
    key: ApiKey
    metrics: Metrics

    def sample(self, name: str, **labels: str) -> float | None:
        """A value of the app's Prometheus metrics, as `GET /metrics` shows it."""
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default chat model with 32-token prefill steps (a long prompt prefills over many short steps, so a
    disconnect lands mid-prefill on any machine), on the real app with a concurrency-limited key."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("disconnect"),
        api_keys=(KEY,),
        max_concurrent_per_key=8,
        prefill_chunk=32,
        decoding_prefill_chunk=32,
        kv_cache_gb=0.25,
    )
    registry = ModelRegistry()
    registry.add(ServedModel(id=CHAT, kind="chat", path=smollm2_dir))
    load(registry, settings)
    registry.mark_ready()
    app = create_app(settings, registry)
    try:
        with running_server(app) as url:
            state = app.state
            yield Server(url, registry.get(CHAT).engine, state.limits, state.keys.lookup(KEY), state.metrics)
    finally:
        shutdown(registry)


@pytest.fixture(autouse=True)
def stop_leftovers(server: Server) -> Iterator[None]:
    """A test that failed leaves nothing running for the next one."""
    yield
    server.engine.abort_all()
    assert _wait(lambda: server.engine.stats().running + server.engine.stats().waiting == 0, 60)


def _body(server: Server, endpoint: str, prompt: str, stream: bool) -> tuple[str, dict[str, object]]:
    """A request for `endpoint` that only an abort can end before MAX_TOKENS tokens."""
    no_eos = {str(token): -100 for token in server.engine.eos_ids}
    if endpoint == "chat":
        return "/v1/chat/completions", {
            "model": CHAT,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "logit_bias": no_eos,
            "stream": stream,
        }
    if endpoint == "completions":
        return "/v1/completions", {
            "model": CHAT,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "logit_bias": no_eos,
            "stream": stream,
        }
    return "/v1/responses", {
        "model": CHAT,
        "input": prompt,
        "max_output_tokens": MAX_TOKENS,
        "text": {"format": ENDLESS},
        "store": False,
        "stream": stream,
    }


def _long_prompt(engine: Engine, tokens: int) -> str:
    """A prompt of at most `tokens` tokens that no earlier request shares (nothing to reuse from the cache)."""
    rng = random.Random()
    names = ["amber", "river", "stone", "cloud", "tiger", "lamp", "violet", "harbor", "copper", "meadow"]
    words = [f"{rng.choice(names)}{rng.randrange(1000)}" for _ in range(tokens)]
    while len(engine.tokenizer.encode(" ".join(words))) > tokens:
        words = words[: len(words) * 9 // 10]
    return " ".join(words)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _open(server: Server, path: str, body: dict[str, object]) -> socket.socket:
    """Send a POST over a raw socket and leave its answer unread."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def _unanswered(sock: socket.socket) -> bool:
    """True while the server has sent nothing back but a stream's start; fails the test on any other answer."""
    try:
        answer = sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    streamed = b"text/event-stream" in answer and answer.startswith(b"HTTP/1.1 200")
    assert streamed, f"answered before the disconnect: {answer[:600]!r}"
    return True


def _abandon(server: Server, path: str, body: dict[str, object], started: Callable[[EngineStats], bool]) -> EngineStats:
    """Send the request, close the connection once `started(stats)` holds; the engine's stats at that moment."""
    sock = _open(server, path, body)
    try:
        assert _wait(lambda: _unanswered(sock) and started(server.engine.stats()), 120), "it never started"
        at_close = server.engine.stats()
    finally:
        sock.close()
    return at_close


def _assert_released(server: Server, baseline: EngineStats) -> EngineStats:
    """Running and waiting sequences, used KV blocks and the key's concurrency slot all back to the baseline."""

    def idle() -> bool:
        stats = server.engine.stats()
        return (stats.running, stats.waiting, stats.blocks_used) == (0, 0, baseline.blocks_used)

    assert _wait(idle, ABORT_DEADLINE), f"still running after the disconnect: {server.engine.stats()}"
    assert _wait(lambda: server.limits._state(server.key).running == 0, 5), "the key's concurrency slot is held"
    assert server.sample("mlx_dropin_sequences", model=CHAT, state="running") == 0
    assert server.sample("mlx_dropin_kv_blocks", model=CHAT, state="used") == baseline.blocks_used
    stats = server.engine.stats()
    assert stats.requests_finished == stats.requests_submitted
    server.engine.check_integrity()
    return stats


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses"])
def test_disconnect_while_decoding_aborts(server: Server, endpoint: str, stream: bool) -> None:
    baseline = server.engine.stats()
    path, body = _body(server, endpoint, "Write a very long story about a lighthouse keeper.", stream)
    closed = server.sample("mlx_dropin_requests_total", route=path, method="POST", status="499") or 0
    at_close = _abandon(server, path, body, lambda s: s.generated_tokens >= baseline.generated_tokens + 2)
    assert at_close.running == 1  # decoding when the client left
    after = _assert_released(server, baseline)
    if not stream:  # the route ended at once, as "client closed request" in the access log and metrics
        assert _wait(
            lambda: server.sample("mlx_dropin_requests_total", route=path, method="POST", status="499") == closed + 1, 5
        )
    # without the abort it would still be decoding: only max_tokens could end it, and far fewer were made
    assert after.generated_tokens - baseline.generated_tokens < MAX_TOKENS // 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses"])
def test_disconnect_during_prefill_aborts_before_the_first_token(server: Server, endpoint: str, stream: bool) -> None:
    prompt = _long_prompt(server.engine, 640)  # 20 prefill steps
    prompt_tokens = len(server.engine.tokenizer.encode(prompt))
    baseline = server.engine.stats()
    path, body = _body(server, endpoint, prompt, stream)
    at_close = _abandon(server, path, body, lambda s: s.prompt_tokens_computed > baseline.prompt_tokens_computed)
    assert at_close.generated_tokens == baseline.generated_tokens  # still prefilling when the client left
    after = _assert_released(server, baseline)
    assert after.generated_tokens == baseline.generated_tokens  # aborted before its first token
    assert after.prompt_tokens_computed - baseline.prompt_tokens_computed < prompt_tokens  # and mid-prefill


def test_a_patient_client_still_gets_its_answer(server: Server) -> None:
    """The disconnect watcher changes nothing for a client that waits: same answer, slot released after."""
    path, body = _body(server, "chat", "Say hello.", False)
    reply = httpx.post(
        server.url + path,
        json={**body, "max_tokens": 3, "temperature": 0},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    assert reply.json()["usage"]["completion_tokens"] == 3
    assert _wait(lambda: server.limits._state(server.key).running == 0, 5)
