"""Run the real ASGI app on hypercorn in a background thread, for tests that speak HTTP to it; load tiny
model directories into a registry for it (`loaded_models`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette

from server.config import Settings
from server.model_lifecycle import load, unload
from server.registry import ModelRegistry, ServedModel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ring_launch(ranks: int = 2) -> list[str]:
    """`mlx.launch --backend ring -n RANKS --python PY` on loopback ports found free now: its default ports
    (32323 and up) are the same for every launch, and a launch right after another could find them still
    held by the last one's ranks. It polls its stdin: give it an open pipe, not /dev/null (at EOF it spins)."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + ranks < 65536 and all(_port_free(base + i) for i in range(ranks)):
            break
    return [
        str(launcher),
        "--backend",
        "ring",
        "-n",
        str(ranks),
        "--starting-port",
        str(base),
        "--python",
        sys.executable,
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # the state follows "(name)"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def running_server(app: Starlette) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL (`http://127.0.0.1:PORT`)."""
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
    try:
        yield base
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def tiny_settings(root: Path, kv_cache_gb: float) -> Settings:
    """Settings for tests serving tiny models: caches and data under `root`, a small KV pool."""
    return Settings(cache_dir=root / "cache", data_dir=root / "data", kv_cache_gb=kv_cache_gb)


@contextlib.contextmanager
def loaded_models(dirs: dict[str, Path], settings: Settings) -> Iterator[ModelRegistry]:
    """A ready registry serving each model directory as a chat model under its key; unloaded on exit."""
    registry = ModelRegistry()
    for name, path in dirs.items():
        registry.add(ServedModel(id=name, kind="chat", path=path))
    load(registry, settings)
    registry.mark_ready()
    try:
        yield registry
    finally:
        for served in registry.list():
            unload(served)


def run_conformance_kit(base_url: str, model: str, *pytest_args: str, env: dict[str, str] | None = None) -> None:
    """The conformance kit (`compat/`) against a live server at `base_url` (ending in /v1) for `model`; fails the
    calling test with the kit's report unless every selected check passes."""
    env = {**(env if env is not None else os.environ), "COMPAT_BASE_URL": base_url, "COMPAT_MODEL": model}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "compat", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
