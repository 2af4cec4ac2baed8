"""Graceful shutdown and crash safety of the real server process (`python -m server serve`).

The deadline (in process): a JSON chat answer comes back with finish_reason "abort", a streamed
response ends with response.incomplete, reason "interrupted".

SIGTERM: streams in flight finish, or end with finish_reason "abort" and `data: [DONE]` at the
--shutdown-timeout deadline; the running fine-tuning job is failed with code server_shutdown; the
process exits 0. kill -9 while files upload and jobs are created: after a restart on the same data dir
SQLite passes its integrity check, every file row has its bytes, no job is left running, and the
orphaned training worker stops by itself.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from server.shutdown import GracefulShutdown
from tests.serving import free_port, running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHAT = "smollm2-135m-instruct"
GRACE = 6.0
TRAINING = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]})
    + "\n"
    for i in range(12)
).encode()


class Server:
    """`python -m server serve` on a free port with its data in `data_dir`; output goes to a log file."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        env = {**os.environ, "MLX_DROPIN_DATA_DIR": str(data_dir)}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--offline", *flags],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 180  # model load: ~10 s alone, more on a busy machine
        while True:
            assert self.process.poll() is None, f"server exited early:\n{self.tail()}"
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server never became ready:\n{self.tail()}"
            time.sleep(0.25)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def upload(base: str, data: bytes, name: str = "train.jsonl") -> str:
    response = httpx.post(
        base + "/v1/files", files={"file": (name, io.BytesIO(data))}, data={"purpose": "fine-tune"}, timeout=30
    )
    response.raise_for_status()
    return str(response.json()["id"])


def create_job(base: str, file_id: str) -> str:
    response = httpx.post(base + "/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": file_id}, timeout=30)
    response.raise_for_status()
    return str(response.json()["id"])


def wait_running(base: str, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the job never started running"
        time.sleep(0.2)


class Stream(threading.Thread):
    """A streamed chat completion read to its end: the data payloads, and when the last one came."""

    def __init__(self, base: str, max_tokens: int, endless: bool) -> None:
        super().__init__(daemon=True)
        self.body = {
            "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0,
            **({"logit_bias": {"2": -100, "0": -100}} if endless else {}),
        }  # no end-of-text token
        self.base = base
        self.data: list[str] = []
        self.started = threading.Event()
        self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.base + "/v1/chat/completions", json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line[len("data: ") :])
                        if len(self.data) >= 2:
                            self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        self.ended_at = time.monotonic()
        self.started.set()

    def finish_reason(self) -> str | None:
        reasons = [c["finish_reason"] for d in self.data[:-1] for c in json.loads(d)["choices"]]
        return next((r for r in reversed(reasons) if r is not None), None)


def integrity(data_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(data_dir / "mlx-dropin.sqlite3")
    db.row_factory = sqlite3.Row
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return db


def test_the_deadline_ends_json_answers_and_response_streams_as_interrupted(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    endless = {
        "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
        "max_tokens": 4000,
        "logit_bias": {"2": -100, "0": -100},
    }
    answers: dict[str, httpx.Response] = {}
    with running_server(create_app(Settings(data_dir=tmp_path), registry)) as base:

        def ask(name: str, path: str, body: dict[str, object]) -> None:
            answers[name] = httpx.post(base + path, json=body, timeout=120)

        calls = [
            threading.Thread(target=ask, args=("chat", "/v1/chat/completions", endless)),
            threading.Thread(
                target=ask,
                args=(
                    "responses",
                    "/v1/responses",
                    {"input": "Count from 1 to 1000.", "max_output_tokens": 4000, "temperature": 0, "stream": True},
                ),
            ),
        ]
        for call in calls:
            call.start()
        deadline = time.monotonic() + 60
        while registry.get(CHAT).engine.stats().running < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        GracefulShutdown(registry, timeout=0).abort_in_flight()
        for call in calls:
            call.join(60)
    chat = answers["chat"].json()
    assert answers["chat"].status_code == 200 and chat["choices"][0]["finish_reason"] == "abort"
    events = [json.loads(line[6:]) for line in answers["responses"].text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "interrupted"}


def test_sigterm_finishes_or_aborts_streams_fails_the_running_job_and_exits_zero(
    tmp_path: Path, servers: list[Server]
) -> None:
    data_dir = tmp_path / "data"
    server = Server(data_dir, "--shutdown-timeout", str(GRACE), "--max-training-jobs", "1")
    servers.append(server)
    job = create_job(server.base, upload(server.base, TRAINING))
    wait_running(server.base, job)
    short, endless = Stream(server.base, 4, endless=False), Stream(server.base, 4000, endless=True)
    for stream in (short, endless):
        stream.start()
        assert stream.started.wait(60), server.tail()
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1)
    with pytest.raises(httpx.TransportError):  # the listener is closed at once
        httpx.get(server.base + "/health", timeout=2)
    for stream in (short, endless):
        stream.join(GRACE + 30)
        assert stream.error is None and stream.data[-1] == "[DONE]", (stream.error, stream.data[-3:])
    assert short.finish_reason() in ("stop", "length")
    assert endless.finish_reason() == "abort"
    assert GRACE - 0.5 <= endless.ended_at - signalled <= GRACE + 5, endless.ended_at - signalled
    assert server.process.wait(timeout=30) == 0, server.tail()
    assert time.monotonic() - signalled < GRACE + 25
    row = integrity(data_dir).execute("SELECT status, error FROM ft_jobs WHERE id = ?", (job,)).fetchone()
    assert row["status"] == "failed" and json.loads(row["error"])["code"] == "server_shutdown"


def test_kill_9_while_writing_leaves_a_consistent_store(tmp_path: Path, servers: list[Server]) -> None:
    data_dir = tmp_path / "data"
    first = Server(data_dir, "--max-training-jobs", "1")
    servers.append(first)
    running = create_job(first.base, upload(first.base, TRAINING))
    wait_running(first.base, running)
    invalid = upload(first.base, b"not json\n", "bad.jsonl")  # jobs on it fail validation: no more training
    done = {"files": 0, "jobs": 0}
    stop = threading.Event()

    def write(kind: str) -> None:
        payload = os.urandom(256 * 1024)
        while not stop.is_set():
            try:
                upload(first.base, payload, "blob.bin") if kind == "files" else create_job(first.base, invalid)
                done[kind] += 1
            except httpx.HTTPError:
                return  # the server is gone

    writers = [threading.Thread(target=write, args=(kind,), daemon=True) for kind in ("files", "jobs")]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + 60
    while min(done.values()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.process.kill()  # SIGKILL, mid-write
    first.process.wait()
    stop.set()
    for writer in writers:
        writer.join(30)
    assert min(done.values()) >= 5, done
    worker = integrity(data_dir).execute("SELECT worker_pid FROM ft_jobs WHERE id = ?", (running,)).fetchone()[0]

    second = Server(data_dir)
    servers.append(second)
    db = integrity(data_dir)
    rows = db.execute("SELECT id, bytes FROM files").fetchall()
    assert len(rows) >= done["files"] + 2
    for row in rows:
        path = data_dir / "files" / row["id"]
        assert path.is_file() and path.stat().st_size == row["bytes"], row["id"]
    assert db.execute("SELECT count(*) FROM ft_jobs WHERE status = 'running'").fetchone()[0] == 0
    job = httpx.get(f"{second.base}/v1/fine_tuning/jobs/{running}", timeout=10).json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_died"
    listed = httpx.get(second.base + "/v1/files", params={"limit": 10_000}, timeout=10).json()["data"]
    assert {f["id"] for f in listed} == {r["id"] for r in rows}
    # the orphaned training worker notices its server is gone and stops at its next step
    deadline = time.monotonic() + 120
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the orphaned training worker kept running")
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=30) == 0, second.tail()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent, the killed server, cannot reap it)
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")
