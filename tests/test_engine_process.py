"""The engine in a process of its own (`--engine process`, the command's default): the same answers as the
in-process engine, a crash that fails in-flight requests with a 503 and restarts, no engine that outlives
its server, and the messages that cross the pipe.

A tiny random-weight Llama with the default SmolLM2 tokenizer keeps each server start to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from server.engine import (
    CoreSpec,
    Engine,
    EngineClient,
    EngineConfig,
    EngineStartError,
    GenerationRequest,
    GrammarSpec,
    SamplingParams,
    TokenEvent,
    ValidRequest,
)
from server.engine.core_protocol import (
    Add,
    Step,
    encoder,
    from_engine,
    request_from_wire,
    request_to_wire,
    to_engine,
)
from server.models.loading import load_chat_model
from tests.serving import alive, free_port

ROOT = Path(__file__).resolve().parents[1]
BANNED = {"0": -100, "1": -100, "2": -100}  # SmolLM2's special tokens: generations run to max_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A two-layer Llama with random weights and the real SmolLM2 tokenizer."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out = tmp_path_factory.mktemp("tiny-llama")
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config.update(head_dim=16)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(7)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, out / name)
    return out


class ServerProcess:
    """`python -m server serve --model tiny=DIR` (the engine in its own process, the default)."""

    def __init__(self, model_dir: Path, data_dir: Path, *flags: str, ready: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--offline"]
                + ["--no-default-models", "--model", f"tiny={model_dir}", "--data-dir", str(data_dir), *flags],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if ready:
            self.wait_ready(180)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"server exited early:\n{self.tail()}"
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server never became ready:\n{self.tail()}"
            time.sleep(0.2)

    def engine_pids(self) -> list[int]:
        """The server's engine processes (children started by multiprocessing's spawn)."""
        out = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        )
        return [int(line.split()[0]) for line in out.stdout.splitlines() if "spawn_main" in line]

    def chat(self, content: str, max_tokens: int, **extra: object) -> httpx.Response:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logit_bias": BANNED,
            **extra,
        }
        return httpx.post(self.base + "/v1/chat/completions", json=body, timeout=120)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = ServerProcess(tiny_dir, tmp_path_factory.mktemp("engine-process"))
    yield running
    running.stop()


def wait_until(condition: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


# -- the pipe's messages ---------------------------------------------------------------------------
def test_requests_and_events_cross_the_pipe_unchanged() -> None:
    grammar = GrammarSpec("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}}, strict=False)
    params = SamplingParams(
        max_tokens=7,
        temperature=0.3,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logit_bias={5: -3.0, 9: 2.5},
        seed=11,
        stop=("x", "yz"),
        stop_token_ids=(4,),
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
        n=2,
        prompt_logprobs=1,
        grammar=GrammarSpec(grammar.kind, grammar.schema, strict=False, after=(8, 9), opens=(7,), budget=12),
        skip_special_tokens=False,
    )
    request = ValidRequest("r-1", [1, 2, 3], params, "conv", b"\x00salt", False, 7)
    back = request_from_wire(to_engine.decode(encoder.encode(Add(request_to_wire(request)))).request)  # type: ignore[union-attr]
    assert (
        back == request and back.params.grammar == params.grammar and dict(back.params.logit_bias) == {5: -3.0, 9: 2.5}
    )
    event = TokenEvent(
        "r-1", 1, 42, "hé", -0.5, [(42, -0.5), (7, -1.0)], "length", 3, 1, 7, None, None, [(2, -1.0, [(2, -1.0)])]
    )
    step = from_engine.decode(encoder.encode(Step([event], {"steps": 3.0})))
    assert isinstance(step, Step) and step.events == [event]


# -- the client, in this process -------------------------------------------------------------------
def test_engine_client_matches_the_in_process_engine(tiny_dir: Path) -> None:
    model, tokenizer = load_chat_model(tiny_dir, "auto")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    config = EngineConfig(kv_cache_gb=0.05)
    local = Engine(model, tokenizer, config)
    local.start()
    try:
        expected = [e.token_id for e in local.generate(GenerationRequest("a", prompt, params))]
    finally:
        local.shutdown()
    client = EngineClient(CoreSpec(tiny_dir, "auto", config, exact_cpu_layers=True), tokenizer)
    client.start()
    try:
        assert client.alive and client.context_length == local.context_length and client.eos_ids == local.eos_ids
        got = [e.token_id for e in client.generate(GenerationRequest("b", prompt, params))]
        assert got == expected and len(got) == 12
        assert wait_until(lambda: client.stats().generated_tokens >= 12, 5)  # stats arrive from the process
        assert client.stats().blocks_total == local.pool.num_blocks
        assert client.memory["active"] > 0  # the process's MLX memory, for /metrics
        pid = client.pid
        assert pid is not None and alive(pid)
    finally:
        client.shutdown()
    assert not alive(pid) and not client.alive


def test_an_engine_process_that_cannot_load_fails_start_up_clearly(tmp_path: Path, tiny_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    client = EngineClient(CoreSpec(broken, "auto", EngineConfig(kv_cache_gb=0.05), True), None)
    with pytest.raises(EngineStartError, match="safetensors|header|Error"):
        client.start()
    assert client.pid is None or not alive(client.pid)


def test_the_engine_process_gets_the_settings_that_apply_there(tmp_path: Path) -> None:
    """--mlx-cache-gb, --dtype, the engine's limits and the log level reach the process that holds the KV pool
    (the cache limit once stayed behind in the HTTP process)."""
    from server.config import parse_settings
    from server.model_lifecycle import engine_process_spec
    from server.registry import ServedModel

    settings = parse_settings(
        ["--mlx-cache-gb", "1.5", "--dtype", "float16", "--max-num-seqs", "7", "--log-level", "debug"], {}
    )
    spec = engine_process_spec(ServedModel(id="m", kind="chat", path=tmp_path), settings)
    assert (spec.path, spec.dtype, spec.mlx_cache_gb, spec.log_level) == (tmp_path, "float16", 1.5, "debug")
    assert spec.engine_config == settings.engine_config() and spec.engine_config.scheduler.max_num_seqs == 7


# -- the server ------------------------------------------------------------------------------------
def test_the_server_answers_through_its_engine_process(server: ServerProcess) -> None:
    (pid,) = server.engine_pids()
    answer = server.chat("Say hello.", 6)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 6
    with httpx.stream(
        "POST",
        server.base + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 6,
            "temperature": 0,
            "logit_bias": BANNED,
            "stream": True,
        },
        timeout=60,
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if json.loads(line[6:])["choices"]
    )
    assert lines[-1] == "data: [DONE]" and text == answer.json()["choices"][0]["message"]["content"]
    too_long = server.chat("word " * 9000, 4)  # refused in the server process, before the pipe
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages"
    assert server.engine_pids() == [pid]

    # both processes froze their start-up heaps out of garbage collection (server/gc_heap.py)
    def frozen(who: str) -> bool:
        return any(who in line and "start-up objects frozen" in line for line in server.log.read_text().splitlines())

    assert wait_until(lambda: frozen("server: ") and frozen("engine process for tiny"), 10), server.tail()
    metrics = httpx.get(server.base + "/metrics", timeout=10).text
    assert 'mlx_dropin_mlx_memory_bytes{kind="active",process="tiny"}' in metrics
    # the HTTP process holds no MLX weights: it reports (and, on a GPU, starts) no device of its own
    assert 'process="server"' not in metrics


def test_a_dead_engine_process_fails_its_requests_with_503_and_restarts(server: ServerProcess) -> None:
    (pid,) = server.engine_pids()
    long_body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 3000,
        "temperature": 0,
        "logit_bias": BANNED,
        "stream": True,
    }
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=long_body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content"' in line and '"role"' not in line)  # a token arrived
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    error = json.loads(rest[-1][6:])["error"]
    assert error["code"] == "engine_unavailable" and "restarting" in error["message"]
    ready = httpx.get(server.base + "/ready", timeout=5)
    if ready.status_code == 503:  # the new process loads: requests meanwhile are refused at once, not hung
        assert ready.json()["status"] == "restarting" and ready.headers["retry-after"]
        refused = server.chat("Hi", 2)
        assert refused.status_code in (503, 200)
        if refused.status_code == 503:
            assert refused.json()["error"]["code"] == "engine_unavailable" and refused.headers["retry-after"]
    server.wait_ready(120)
    (new_pid,) = server.engine_pids()
    assert new_pid != pid and not alive(pid)
    again = server.chat("Say hello.", 4)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert "exited (code -9); restarting it" in server.log.read_text()


def test_a_non_streamed_request_in_flight_gets_a_503_when_its_engine_dies(server: ServerProcess) -> None:
    server.wait_ready(120)
    (pid,) = server.engine_pids()
    import threading

    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(server.chat("Tell a long story.", 3000)))
    worker.start()
    assert wait_until(lambda: "running" in httpx.get(server.base + "/metrics").text and _running(server) > 0, 30)
    os.kill(pid, signal.SIGKILL)
    worker.join(60)
    assert result and result[0].status_code == 503, result[0].text if result else "no answer"
    assert result[0].json()["error"]["code"] == "engine_unavailable"
    server.wait_ready(120)


def _running(server: ServerProcess) -> float:
    text = httpx.get(server.base + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mlx_dropin_sequences{") and 'state="running"' in line
    )


def test_the_engine_process_goes_with_its_server(tiny_dir: Path, tmp_path: Path) -> None:
    """SIGTERM: the server stops its engine and exits 0. kill -9: the engine process sees its pipe close and
    exits too: no generation outlives the server."""
    first = ServerProcess(tiny_dir, tmp_path / "a")
    (pid,) = first.engine_pids()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0, first.tail()
    assert wait_until(lambda: not alive(pid), 10)
    assert "terminate called" not in first.tail() and "Traceback" not in first.tail()
    second = ServerProcess(tiny_dir, tmp_path / "b")
    (pid,) = second.engine_pids()
    second.process.kill()
    second.process.wait()
    assert wait_until(lambda: not alive(pid), 15), "the engine process outlived its server"


def test_an_engine_process_still_loading_goes_with_its_server(tiny_dir: Path, tmp_path: Path) -> None:
    """kill -9 while the engine process loads its model: it ends as well, at once rather than when it would
    next read its pipe. (It once finished loading, failed to report Ready on the broken pipe, and then waited
    forever for its stats thread at interpreter exit, holding the model's memory.)"""
    server = ServerProcess(tiny_dir, tmp_path, ready=False)
    try:
        assert wait_until(lambda: server.engine_pids(), 60), server.tail()
        (pid,) = server.engine_pids()
    finally:
        server.process.kill()
        server.process.wait()
    assert "KV pool:" not in server.tail()  # killed while it loaded
    assert wait_until(lambda: not alive(pid), 15), "the loading engine process outlived its server"
