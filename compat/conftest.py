"""Fixtures of the conformance kit: the server under test, clients for it, and the score table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

_results: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})


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
    env = {**os.environ, "MLX_DROPIN_API_KEYS": "", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "compat" not in report.nodeid or (report.when != "call" and not report.skipped and report.passed):
        return
    area = Path(report.nodeid.split("::")[0]).stem.removeprefix("test_")
    if report.when == "call" or report.skipped or report.failed:
        outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
        _results[area][outcome] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _results:
        return
    terminalreporter.section("OpenAI conformance score")
    terminalreporter.write_line(f"{'area':<16}{'passed':>8}{'failed':>8}{'skipped':>9}")
    total_pass = total = 0
    for area, counts in sorted(_results.items()):
        terminalreporter.write_line(f"{area:<16}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}")
        total_pass += counts["passed"]
        total += counts["passed"] + counts["failed"]
    terminalreporter.write_line(f"score: {total_pass}/{total} checks passed")
