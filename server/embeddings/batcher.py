"""Micro-batching for embeddings: one worker thread per encoder gathers concurrent requests.

Requests arriving within a couple of milliseconds of each other, or while the
worker is busy, are embedded together: each encoder call takes up to
`max_batch` inputs, an equal share from every waiting request, sorted by
length so padding stays small. All MLX work for the encoder happens on the
worker thread; results go back to each request's event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GATHER_SECONDS = 0.002
MAX_BATCH = 32


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    result: np.ndarray | None = None
    todo: list[int] = field(default_factory=list)  # indices not yet embedded, shortest first
    failed: bool = False


class EmbeddingBatcher:
    """Embeds lists of token-id sequences for many concurrent callers, batched together.

    Each encoder call takes at most `max_batch` inputs, shared round-robin among
    the requests waiting, so a one-line request never waits behind all of a
    2048-input one: only behind the call in progress. Between calls the worker
    lets go of the CPU, which keeps the chat engine's thread decoding.
    """

    def __init__(self, encoder: Any, max_batch: int = MAX_BATCH) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0  # encoder calls made, for tests and metrics
        self.inputs = 0  # inputs embedded
        self._thread = threading.Thread(target=self._run, name="embedding-batcher", daemon=True)
        self._thread.start()

    async def embed(self, ids: list[list[int]]) -> np.ndarray:
        """(len(ids), dimensions) float32 embeddings, in input order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._jobs.put(_Job(ids, future, loop))
        return await future

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _admit(self, job: _Job, active: list[_Job]) -> None:
        job.result = np.zeros((len(job.ids), self.encoder.dimensions), np.float32)
        job.todo = sorted(range(len(job.ids)), key=lambda i: len(job.ids[i]))
        active.append(job)

    def _drain(self, active: list[_Job], wait: float) -> bool:
        """Move newly queued jobs into `active`, waiting up to `wait` s for the first; False on shutdown."""
        deadline = time.monotonic() + wait
        while True:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic())) if wait else self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._admit(job, active)

    def _next_chunk(self, active: list[_Job]) -> list[tuple[_Job, int]]:
        """Up to max_batch (job, index) pairs, an equal share from every waiting job."""
        chunk: list[tuple[_Job, int]] = []
        share = max(1, self.max_batch // len(active))
        for job in active:
            take, job.todo = job.todo[:share], job.todo[share:]
            chunk += [(job, i) for i in take]
        for job in active:  # fill what the shares left over, oldest request first
            room = self.max_batch - len(chunk)
            if room <= 0:
                break
            take, job.todo = job.todo[:room], job.todo[room:]
            chunk += [(job, i) for i in take]
        return sorted(chunk, key=lambda item: len(item[0].ids[item[1]]))

    def _run(self) -> None:
        active: list[_Job] = []
        running = True
        while running or active:
            if not active:
                first = self._jobs.get()
                if first is None:
                    return
                self._admit(first, active)
                running = self._drain(active, GATHER_SECONDS)  # let simultaneous requests join
            else:
                running = self._drain(active, 0.0) and running
            active[:] = [job for job in active if not job.future.done()]  # the caller went away
            if not active:
                continue
            chunk = self._next_chunk(active)
            try:
                vectors = self.encoder.embed_ids([job.ids[i] for job, i in chunk])
            except Exception as exc:  # fail the requests that were in this call
                for job in {id(job): job for job, _ in chunk}.values():
                    job.failed = True
                    job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            else:
                self.batches += 1
                self.inputs += len(chunk)
                for (job, i), vector in zip(chunk, vectors):
                    assert job.result is not None, "_admit gave every active job its result array"
                    job.result[i] = vector
            for job in [j for j in active if j.failed or not j.todo]:
                active.remove(job)
                if not job.failed:
                    job.loop.call_soon_threadsafe(_settle, job.future, job.result, None)
            if not running and not active:
                return


def _settle(future: asyncio.Future[np.ndarray], value: np.ndarray | None, exc: Exception | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert value is not None, "a job settles with its result or an exception"
        future.set_result(value)
