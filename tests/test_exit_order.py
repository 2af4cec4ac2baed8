"""The server process ends cleanly on SIGTERM: exit status 0, and no "terminate called", abort or traceback.

The crash this guards against: a daemon thread inside MLX (which releases the GIL) while the interpreter
finalizes is ended by CPython with pthread_exit, and the C++ runtime aborts the process ("terminate called
without an active exception", status 134). A SIGTERM while the models load showed it on this CPU every
time (the loader thread is inside MLX); exit_order.py is the fix. The idle and mid-stream cases run the
same check on a fully started server (on a GPU its engine and output threads are the ones at risk).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import alive, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CRASH_SIGNS = ("terminate called", "Abort", "Traceback", "core dumped")


class Process:
    """`python -m server serve` on a free port, its output in a log file."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--offline"]
                + ["--shutdown-timeout", "2", "--data-dir", str(tmp / "data")],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, marker: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            assert self.process.poll() is None, f"server exited early:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {marker!r} in the log:\n{self.text()[-4000:]}"
            time.sleep(0.01)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, f"server exited early:\n{self.text()[-4000:]}"
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server never became ready:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def terminate_cleanly(self) -> str:
        """SIGTERM; the process must exit 0 with no sign of a crash, and its engine processes end too (one that
        was still loading once stayed behind for good). Returns the log."""
        children = self.children()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        log = self.text()
        assert code == 0, f"exit status {code}:\n{log[-4000:]}"
        assert not [s for s in CRASH_SIGNS if s in log], log[-4000:]
        deadline = time.monotonic() + 20
        while (left := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes {left} outlived the server"
        return log

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def test_sigterm_while_the_models_load_exits_zero(tmp_path: Path, processes: list[Process]) -> None:
    # the chat engine logs its pool while the loader goes on into MLX with the next model: before exit_order.py
    # this SIGTERM ended in "terminate called without an active exception" and status -6 (SIGABRT)
    server = Process(tmp_path)
    processes.append(server)
    server.wait_for_log("KV pool:")
    server.terminate_cleanly()


def test_sigterm_idle_exits_zero(tmp_path: Path, processes: list[Process]) -> None:
    server = Process(tmp_path)
    processes.append(server)
    server.wait_ready()
    answer = httpx.post(
        server.base + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    server.terminate_cleanly()


def test_sigterm_mid_stream_exits_zero_and_ends_the_stream(tmp_path: Path, processes: list[Process]) -> None:
    server = Process(tmp_path)
    processes.append(server)
    server.wait_ready()
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        body = {
            "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
            "stream": True,
            "max_tokens": 4000,
            "temperature": 0,
            "logit_bias": {"2": -100, "0": -100},  # no end-of-text token: it runs until aborted
        }
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) >= 6:
                    started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(60), server.text()[-4000:]
    server.terminate_cleanly()
    reader.join(30)
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""], lines[-3:]


SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import mlx.core as mx
    from server.exit_order import exit_code, stop_model_threads
    from server.registry import ModelRegistry

    def busy():  # a loader inside MLX: many short evaluations, the GIL released in each
        a = mx.random.normal((64, 64))
        while True:
            mx.eval(a @ a)

    loader = threading.Thread(target=busy, name="model-loader", daemon=True)
    loader.start()
    time.sleep(0.3)
    if sys.argv[1] == "ordered":
        sys.exit(exit_code(0, stop_model_threads(ModelRegistry(), loader)))
    """
)


def test_a_thread_inside_mlx_at_exit_no_longer_aborts_the_process() -> None:
    """The mechanism on its own, deterministic: plain interpreter exit with a daemon thread in MLX aborts
    (the control, on the Pythons that end such threads with pthread_exit); exit_order's path exits 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ordered = subprocess.run([sys.executable, "-c", SCRIPT, "ordered"], cwd=ROOT, env=env, capture_output=True)
    assert ordered.returncode == 0 and b"terminate called" not in ordered.stderr, ordered.stderr[-2000:]
    if sys.version_info < (3, 14):  # 3.14 hangs such threads instead of unwinding them
        plain = subprocess.run([sys.executable, "-c", SCRIPT, "plain"], cwd=ROOT, env=env, capture_output=True)
        assert plain.returncode != 0 and b"terminate called" in plain.stderr, (plain.returncode, plain.stderr)
