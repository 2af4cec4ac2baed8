"""`mlx-dropin serve` over two ranks, launched as a user launches it (`mlx.launch --backend ring -n 2` on loopback):
rank 0 serves HTTP and the first chat model is split over both ranks (tensor parallel).

- Greedy chat answers equal a one-process server's, streamed or not, several at once.
- The conformance kit passes against rank 0 (its fine-tuning checks aside: a split model is not fine-tuned, and
  the server says so with a 400; and its tool and JSON checks, which need a model that follows instructions).
- `/metrics` and the start-up log name the world and each rank's shard.
- The models that are not split (another chat model, an embedding model) serve on rank 0, and the other chat
  model is fine-tuned there and its fine-tuned model answers.
- A rank that dies mid-stream ends the stream with an error, and rank 0's `/ready` answers 503 naming the lost
  rank. Under mlx.launch the launcher then stops rank 0 as well (its rule when a rank exits non-zero), so that
  test starts the two ranks itself with the environment mlx.launch gives them (MLX_RANK, MLX_HOSTFILE), as a
  supervisor that keeps rank 0 running would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.models.cache import ModelCache
from server.models.defaults import MINILM
from tests.real_vocab import tiny_model_dir
from tests.serving import alive, free_port, ring_launch, run_conformance_kit

ROOT = Path(__file__).resolve().parents[2]
COMMAND = Path(sys.executable).with_name("mlx-dropin")
CHAT = {"model": "tiny", "temperature": 0, "max_tokens": 10}
PROMPTS = ["Say something.", "Count to five.", "Name a colour and a fruit, please, in a short sentence."]


def serve_args(model_dir: Path, data_dir: Path, port: int) -> list[str]:
    return [
        str(COMMAND),
        "serve",
        "--port",
        str(port),
        "--offline",
        "--no-default-models",
        "--model",
        f"tiny={model_dir}",
        "--data-dir",
        str(data_dir),
        "--kv-cache-gb",
        "0.05",
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}


def wait_ready(base: str, processes: list[subprocess.Popen[bytes]], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), f"a rank exited early:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"never ready:\n{log.read_text()[-4000:]}")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass(frozen=True)
class Launch:
    base: str  # rank 0's URL
    log: Path  # every rank's output, as mlx.launch relays it
    launcher: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(
        tmp_path_factory.mktemp("split") / "llama",
        vocab="gpt-2",
        template="mistralai-Mistral-Nemo-Instruct-2407",
        model_type="llama",
    )


@pytest.fixture(scope="module")
def single(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same model on one process (the reference)."""
    root = tmp_path_factory.mktemp("single")
    port = free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *serve_args(model_dir, root, port)], cwd=ROOT, env=clean_env(), stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [process], log)
        yield base
    finally:
        stop([process])


@pytest.fixture(scope="module")
def rank_0_models(tmp_path_factory: pytest.TempPathFactory, model_cache: ModelCache) -> list[str]:
    """`--model` flags of what the split model's ranks serve besides it, all on rank 0: another chat model
    (fine-tuned in a test below) and the default embedding model."""
    other = tiny_model_dir(
        tmp_path_factory.mktemp("other") / "llama",
        vocab="gpt-2",
        template="mistralai-Mistral-Nemo-Instruct-2407",
        model_type="llama",
        seed=1,
    )
    minilm = model_cache.ready(MINILM.id)
    assert minilm is not None, "the default embedding model is not in the cache (the registry fixture fetches it)"
    return ["--model", f"other={other}", "--model", f"emb={minilm}"]


@pytest.fixture(scope="module")
def launched(model_dir: Path, rank_0_models: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    """`mlx.launch --backend ring -n 2 -- mlx-dropin serve ...`: `tiny` (the first chat model) split over both
    ranks, `other` and `emb` on rank 0."""
    root = tmp_path_factory.mktemp("launched")
    port = free_port()
    log = root / "launch.log"
    command = ring_launch(2)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, *serve_args(model_dir, root, port), *rank_0_models],
            cwd=ROOT,
            env=clean_env(),
            stdin=subprocess.PIPE,  # mlx.launch polls its stdin: at EOF (/dev/null) that loop spins a core
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [process], log)
        yield Launch(base, log, process)
    finally:
        stop([process])


def chat_all(base: str, stream: bool) -> list[str]:
    """Every prompt at once; each answer's text."""
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        body = {**CHAT, "messages": [{"role": "user", "content": PROMPTS[i]}], "stream": stream}
        if not stream:
            answers[i] = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0][
                "message"
            ]["content"]
            return
        text = ""
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content") or ""
        answers[i] = text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [answers[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answers_equal_one_process(single: str, launched: Launch, stream: bool) -> None:
    expected = chat_all(single, stream)
    assert all(expected)
    assert chat_all(launched.base, stream) == expected


def test_world_and_shards_are_reported(launched: Launch) -> None:
    base, log = launched.base, launched.log
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'mlx_dropin_world_size{backend="any"} 2.0' in metrics
    assert 'mlx_dropin_model_shard_heads{heads="kv",mode="tensor",model="tiny"} 1.0' in metrics
    text = log.read_text()
    for rank in (0, 1):
        assert f"distributed: rank {rank} of 2" in text
        assert f"tiny: tensor parallel, rank {rank} of 2: 2 attention heads and 1 KV heads per layer" in text


# The kit's checks whose answers need a model that follows instructions (tool calls and JSON that fit its token
# limits): a random-weight model runs out of tokens in them on one process just the same. The whole kit passes
# against SmolLM2-135M split over three ranks (9 heads: not two), which on this 2-core machine takes ~11 minutes
# (three ranks polling two cores), too long for the suite; bench/README.md has the command.
NEEDS_A_REAL_MODEL = (
    "sdk_stream_helper",
    "sdk_forced_tool_call",
    "sdk_tool_round_trip",
    "sdk_streamed_tool_call_deltas",
    "sdk_json_object",
    "sdk_json_schema",
    "langchain_bind_tools_round_trip",
    "langchain_with_structured_output",
    "responses_tool_round_trip",
    "responses_streamed_function_call",
    "responses_json_schema",
)


def test_conformance_kit_against_rank_0(launched: Launch) -> None:
    """The kit on the tiny split model: everything but fine-tuning (refused for a split model, below) and the
    checks that need a real model (see NEEDS_A_REAL_MODEL)."""
    selection = " and ".join(["not fine_tuning", *(f"not {name}" for name in NEEDS_A_REAL_MODEL)])
    run_conformance_kit(launched.base + "/v1", "tiny", "-k", selection, env=clean_env())


def test_a_split_model_is_not_fine_tuned(launched: Launch) -> None:
    base = launched.base
    upload = httpx.post(
        base + "/v1/files",
        files={
            "file": (
                "t.jsonl",
                b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            )
        },
        data={"purpose": "fine-tune"},
        timeout=30,
    )
    assert upload.status_code == 200, upload.text
    job = httpx.post(
        base + "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": upload.json()["id"]}, timeout=30
    )
    assert job.status_code == 400 and "split over 2 ranks" in job.json()["error"]["message"]


def test_embeddings_and_fine_tuning_work_on_rank_0(launched: Launch) -> None:
    """The models that are not split run on rank 0 as on one machine: embeddings answer, and the other chat
    model is fine-tuned and its fine-tuned model answers, while the split model keeps answering."""
    base = launched.base
    vectors = httpx.post(base + "/v1/embeddings", json={"model": "emb", "input": ["a", "b c"]}, timeout=60)
    assert vectors.status_code == 200, vectors.text
    assert [len(item["embedding"]) for item in vectors.json()["data"]] == [384, 384]
    lines = b"".join(
        b'{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}\n' % (i, i)
        for i in range(10)
    )
    upload = httpx.post(
        base + "/v1/files", files={"file": ("t.jsonl", lines)}, data={"purpose": "fine-tune"}, timeout=30
    )
    assert upload.status_code == 200, upload.text
    body = {"model": "other", "training_file": upload.json()["id"], "hyperparameters": {"n_epochs": 1}}
    job = httpx.post(base + "/v1/fine_tuning/jobs", json=body, timeout=30)
    assert job.status_code == 200, job.text
    deadline = time.monotonic() + 300
    while (state := httpx.get(f"{base}/v1/fine_tuning/jobs/{job.json()['id']}", timeout=10).json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    for model in (state["fine_tuned_model"], "tiny"):
        answer = httpx.post(
            base + "/v1/chat/completions",
            json={**CHAT, "model": model, "messages": [{"role": "user", "content": "q1"}]},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"], answer.text


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_lost_rank_ends_the_stream_with_an_error_and_ready_says_503(
    model_dir: Path, tmp_path: Path, fault: str
) -> None:
    """Rank 1 is killed (kill -9) or stops answering (SIGSTOP) mid-stream: within the rank timeout (5 s here) the
    stream ends with an error naming the rank, later requests get a 503 and /ready says "failed"."""
    port = free_port()
    ring = tmp_path / "hosts.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    log = tmp_path / "ranks.log"
    processes = []
    with log.open("wb") as out:
        for rank in (0, 1):
            env = {**clean_env(), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)}
            processes.append(
                subprocess.Popen(
                    # MLX's ring backend sometimes blocks instead of failing a step whose peer died: the rank
                    # timeout is what ends it then
                    [sys.executable, *serve_args(model_dir, tmp_path, port), "--rank-timeout", "5"],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=out,
                )
            )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, processes, log)
        events: list[str] = []
        body = {**CHAT, "max_tokens": 4000, "messages": [{"role": "user", "content": "Go on."}], "stream": True}

        def read() -> None:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(events) >= 3, "the stream never started"
        processes[1].send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        reader.join(30)
        assert not reader.is_alive(), "the stream hangs after its rank died"
        assert '"error"' in events[-1] or '"error"' in events[-2], events[-3:]
        assert "rank" in "".join(events[-2:])
        ready = httpx.get(base + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        again = httpx.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert again.status_code == 503
        assert alive(processes[0].pid)
    finally:
        processes[1].kill()  # a stopped process ignores SIGTERM
        stop(processes)


def test_ranks_end_with_their_launcher(launched: Launch) -> None:
    """Runs last: kill -9 of mlx.launch (which cannot pass a signal on) still ends every rank."""
    launcher, log = launched.launcher, launched.log
    ranks = [
        int(pid)
        for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(ranks) == 2, ranks
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks), log.read_text()[-3000:]
