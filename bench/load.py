"""Load and soak: many concurrent streaming clients against a real server process, then its baseline.

Starts `mlx-dropin serve` (default models, a temporary data directory) as a subprocess and runs
waves of --clients concurrent streaming chat requests (each a different prompt, --max-tokens
tokens) for --minutes, sampling the server's resident memory (RSS, from /proc) every --sample
seconds. Every request must end in a complete stream (finish_reason + [DONE]) or a clear 429/503
with OpenAI's error body; anything else (5xx, a broken stream, a transport error) is counted as a
failure. Afterwards the KV pool must be back at its baseline: /metrics shows no running or waiting
sequences and no used blocks beyond what conversations pin.

Prints per-wave outcomes, the RSS curve (per-minute min/max) and a verdict. Exit status 1 on any
failure or a pool that did not return to baseline.

    .venv/bin/python bench/load.py                          # 128 clients, 10-minute soak
    .venv/bin/python bench/load.py --clients 32 --minutes 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def one(client: httpx.AsyncClient, i: int, max_tokens: int) -> str:
    """'ok', '429', '503', or a failure description."""
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "messages": [{"role": "user", "content": f"Client {i}: give me a fact about the number {i % 97}."}],
    }
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code in (429, 503):
                error = json.loads(await r.aread()).get("error", {})
                return str(r.status_code) if error.get("message") and "type" in error else f"bad {r.status_code} body"
            if r.status_code != 200:
                return f"status {r.status_code}"
            finish, done = None, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
            return "ok" if done and finish in ("stop", "length") else f"broken stream ({finish}, done={done})"
    except httpx.HTTPError as exc:
        return f"transport {type(exc).__name__}"


async def wave(base: str, clients: int, max_tokens: int, offset: int) -> Counter[str]:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900), limits=limits) as client:
        results = await asyncio.gather(*(one(client, offset + i, max_tokens) for i in range(clients)))
    return Counter(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    parser.add_argument(
        "--cache-dir",
        help="the server's model cache (default: the server's own rule, "
        "MLX_DROPIN_CACHE_DIR, else ~/.cache/mlx-dropin)",
    )
    args = parser.parse_args()

    port = free_port()
    data = tempfile.mkdtemp(prefix="mlx-dropin-load-")
    log = Path(data) / "server.log"
    env = {**os.environ, "MLX_DROPIN_DATA_DIR": data, "MLX_DROPIN_API_KEYS": "", "PYTHONUNBUFFERED": "1"}
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []  # else the server resolves it itself
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port), *cache, *args.server_arg],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.3)
        baseline = httpx.get(base + "/metrics").text
        used0 = metric(baseline, "mlx_dropin_kv_blocks", model=MODEL, state="used")
        print(
            f"server pid {proc.pid}; {args.clients} clients a wave, {args.max_tokens} tokens each, "
            f"{args.minutes:g} min; baseline RSS {rss_mib(proc.pid):.0f} MiB, used blocks {used0:.0f}"
        )

        samples: list[tuple[float, float]] = []
        stop = False

        async def sampler(start: float) -> None:
            while not stop:
                samples.append((time.monotonic() - start, rss_mib(proc.pid)))
                await asyncio.sleep(args.sample)

        async def soak() -> Counter[str]:
            nonlocal stop
            start = time.monotonic()
            task = asyncio.create_task(sampler(start))
            totals: Counter[str] = Counter()
            n = 0
            while time.monotonic() - start < args.minutes * 60 or n == 0:
                t0 = time.monotonic()
                outcome = await wave(base, args.clients, args.max_tokens, n * args.clients)
                totals += outcome
                n += 1
                print(
                    f"  wave {n}: {dict(outcome)} in {time.monotonic() - t0:.1f}s; RSS {rss_mib(proc.pid):.0f} MiB",
                    flush=True,
                )
            stop = True
            await task
            return totals

        totals = asyncio.run(soak())
        time.sleep(1.0)
        after = httpx.get(base + "/metrics").text
        running = metric(after, "mlx_dropin_sequences", model=MODEL)
        used = metric(after, "mlx_dropin_kv_blocks", model=MODEL, state="used")
        pinned = metric(after, "mlx_dropin_kv_blocks", model=MODEL, state="pinned")
        five_xx = sum(
            float(line.rsplit(" ", 1)[1])
            for line in after.splitlines()
            if line.startswith("mlx_dropin_requests_total{") and re.search(r'status="5(?!03)\d\d"', line)
        )

        print("\nRSS curve (MiB), per minute: min / max")
        by_minute: dict[int, list[float]] = {}
        for t, mib in samples:
            by_minute.setdefault(int(t // 60), []).append(mib)
        for minute, values in sorted(by_minute.items()):
            print(f"  minute {minute:2d}: {min(values):7.0f} / {max(values):7.0f}")
        failures = {k: v for k, v in totals.items() if k not in ("ok", "429", "503")}
        first = by_minute[min(by_minute)]
        last = by_minute[max(by_minute)]
        growth = max(last) - max(first)
        print(f"\noutcomes: {dict(totals)}")
        print(f"5xx other than 503 counted by the server: {five_xx:.0f}")
        print(
            f"pool after: running+waiting {running:.0f}, used blocks {used:.0f} (pinned {pinned:.0f}), "
            f"baseline {used0:.0f}"
        )
        print(f"RSS growth, first minute's max to last minute's max: {growth:+.0f} MiB")
        ok = not failures and five_xx == 0 and running == 0 and used - pinned <= used0
        print("verdict:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
