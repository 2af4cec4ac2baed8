"""Fixtures of the conformance kit: the server under test, clients for it, and the score table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def base_url() -> Iterator[str]:
    """COMPAT_BASE_URL if given; else this server, started as a real process on a free port."""
    given = os.environ.get("COMPAT_BASE_URL")
    if given:
        yield given.rstrip("/")
        return
    port = _free_port()
    root = Path(__file__).resolve().parent.parent
    log_path = Path(os.environ.get("COMPAT_SERVER_LOG", "/tmp/mlx-dropin-compat-server.log"))
    data_dir = tempfile.TemporaryDirectory(prefix="mlx-dropin-compat-")  # stored responses: never in $HOME
    env = {**os.environ, "MLX_DROPIN_API_KEYS": "", "MLX_DROPIN_DATA_DIR": data_dir.name, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in time")
            time.sleep(0.25)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        data_dir.cleanup()


@pytest.fixture(scope="session")
def api_key() -> str:
    return os.environ.get("COMPAT_API_KEY") or "sk-compat"


@pytest.fixture(scope="session")
def client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="session")
def http(base_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {api_key}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def chat_model(client: openai.OpenAI) -> str:
    chosen = os.environ.get("COMPAT_MODEL")
    if chosen:
        return chosen
    ids = [m.id for m in client.models.list().data]
    return "smollm2-135m-instruct" if "smollm2-135m-instruct" in ids else ids[0]


@pytest.fixture(scope="session")
def thinking_model() -> str:
    """COMPAT_THINKING_MODEL: a model that reasons (think blocks); the reasoning checks skip without one."""
    chosen = os.environ.get("COMPAT_THINKING_MODEL")
    if not chosen:
        pytest.skip("no thinking model given (set COMPAT_THINKING_MODEL to a model id that reasons)")
    return chosen


_checks: list[tuple[str, str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "pass" if report.passed else "skip" if report.skipped else "FAIL"
        detail = ""
        if report.failed:
            detail = str(report.longrepr).strip().splitlines()[-1][:100] if report.longrepr else ""
        elif report.skipped and isinstance(report.longrepr, tuple):
            detail = str(report.longrepr[2])[:100]
        _checks.append((report.nodeid.split("::")[-1].removeprefix("test_"), outcome, detail))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _checks:
        return
    terminalreporter.section("OpenAI conformance kit")
    width = max(len(name) for name, _, _ in _checks) + 2
    for name, outcome, detail in _checks:
        terminalreporter.write_line(f"{name:<{width}}{outcome:<6}{detail}")
    passed = sum(1 for _, outcome, _ in _checks if outcome == "pass")
    counted = sum(1 for _, outcome, _ in _checks if outcome != "skip")
    terminalreporter.write_line(f"score: {passed}/{counted} checks passed")
