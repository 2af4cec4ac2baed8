"""Streaming chat clients spread over processes, and what one request saw (the `Stream` record both sides share).

`run_clients` starts --client-procs processes (spawn), each an asyncio loop with one httpx client; each
sends one `GET /v1/models` (its own start-up costs stay off the clock), then they meet at a barrier and
all send their requests at once. Each request is a streaming
`/v1/chat/completions` call; its SSE lines are parsed by hand (the openai SDK costs too much CPU to
read 10k+ events a second). Per request the record keeps its start (the shared start time), when the
client began sending it (`sent`: one client process opens its requests one after another, and the
time before its turn is the client's, not the server's: TTFT counts from `sent`, as vLLM's
benchmark_serving counts it), the
arrival of every chunk that carries content, and `usage.completion_tokens`. A dropped connection
(mlx_lm.server's listen backlog overflows under load) is retried up to RETRIES times; the time counts.
Times are `time.perf_counter()`, a system-wide monotonic clock on Linux and macOS, so the processes'
timestamps compare.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import queue
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

RETRIES = 10


@dataclass
class Stream:
    """One request as its client (or the engine's sink) saw it; times in perf_counter seconds."""

    start: float
    sent: float | None = None  # when the client began sending this request (None: at `start`)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with content (or token)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    retries: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - (self.sent or self.start) if self.chunk_times else None

    @property
    def send_delay(self) -> float:
        """How long after the round's start the client began sending this request."""
        return (self.sent or self.start) - self.start

    @property
    def tokens_per_chunk(self) -> float | None:
        return self.completion_tokens / len(self.chunk_times) if self.chunk_times else None

    def inter_token_gaps(self) -> list[float]:
        """Gaps between content chunks divided by the request's mean tokens per chunk: per-token latency
        (exact when every chunk carries one token; a coalescing server's gaps are split evenly)."""
        per = self.tokens_per_chunk or 1.0
        t = self.chunk_times
        return [(b - a) / per for a, b in zip(t, t[1:])]


_CONTENT = re.compile(rb'"content":\s*"(?!")')  # a delta with text (not the role chunk's "")
_PARSE = re.compile(rb'"(?:usage|error)":\s*[{"]')  # the chunks worth a json.loads: usage, errors


async def _read_events(response: Any, record: Stream) -> None:
    """Record a streaming response's content chunks. The SSE framing is split by hand and only the usage and
    error chunks are parsed: json.loads on every chunk made the clients, not the server, the slow side (and
    their CPU competed with the server's). Chunks that arrive in one read share its arrival time."""
    pending = b""
    async for data in response.aiter_bytes():  # decoded if a server compressed it
        now = time.perf_counter()
        *events, pending = (pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    return
                if _CONTENT.search(payload):
                    record.chunk_times.append(now)
                if _PARSE.search(payload):
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        record.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                        record.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    if chunk.get("error"):
                        record.error = str(chunk["error"])[:200]


async def _one(client: Any, url: str, body: dict[str, Any], record: Stream) -> None:
    record.sent = time.perf_counter()  # a retry's time still counts: the first attempt's moment stays
    for attempt in range(RETRIES + 1):
        record.retries = attempt
        record.chunk_times.clear()
        record.completion_tokens = record.prompt_tokens = 0
        try:
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return
                await _read_events(response, record)
            return
        except Exception as exc:  # httpx transport errors: a dropped or refused connection is retried
            record.error = f"{type(exc).__name__}: {exc}"[:200]
            if attempt == RETRIES:
                return
            record.error = None
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))


async def _client_main(url: str, bodies: list[dict[str, Any]], barrier: Any) -> list[dict[str, Any]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600.0, connect=60.0)) as client:
        # the client's own first-use costs (imports, the first connection, a spawned process's cold code) stay
        # out of the clock: one request before the start, as a client that has run a while has made
        await client.get(url.rsplit("/v1/", 1)[0] + "/v1/models")
        await asyncio.to_thread(barrier.wait)
        start = time.perf_counter()
        records = [Stream(start) for _ in bodies]
        await asyncio.gather(*(_one(client, url, body, r) for body, r in zip(bodies, records)))
    return [asdict(r) for r in records]


def _client_process(url: str, bodies: list[dict[str, Any]], barrier: Any, out: Any, slot: int) -> None:
    try:
        out.put((slot, asyncio.run(_client_main(url, bodies, barrier))))
    except BaseException as exc:  # reported as errors, never a hung benchmark
        out.put((slot, [asdict(Stream(0.0, error=f"client process: {exc!r}")) for _ in bodies]))


def run_clients(url: str, bodies: list[dict[str, Any]], procs: int) -> list[Stream]:
    """Send every body at once from min(procs, len(bodies)) processes; records in the bodies' order."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, len(bodies)))
    shares = [bodies[i::procs] for i in range(procs)]
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(url, s, barrier, out, i)) for i, s in enumerate(shares)]
    for w in workers:
        w.start()
    results: dict[int, list[dict[str, Any]]] = {}
    while len(results) < len(workers):
        try:
            slot, records = out.get(timeout=5)
            results[slot] = records
        except queue.Empty:  # a client process that died without reporting leaves its requests "lost"
            if not any(w.is_alive() for w in workers) and out.empty():
                break
    for w in workers:
        w.join(60)
    merged: list[Stream | None] = [None] * len(bodies)
    for slot, records in results.items():
        for k, record in enumerate(records):
            merged[slot + k * procs] = Stream(**record)
    return [r if r is not None else Stream(0.0, error="lost") for r in merged]
