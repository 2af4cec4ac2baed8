"""A request's events as its caller sees them: the async stream both engines give (`events_of`: every pending
event at once, an error event raised, the request aborted when the caller leaves early), the blocking
collector for scripts and tests (`collect_events`), and the errors an event can carry.

Both `Engine` (engine.py) and `EngineClient` (core_client.py) hand `events_of` their own `submit` and
`abort`, so a request streams the same way wherever its engine runs.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncGenerator, Callable

from server.engine.block_pool import PoolExhaustedError
from server.engine.event_buffer import EventBuffer, LoopWakers
from server.engine.output import Sink
from server.engine.request import GenerationRequest, TokenEvent


class GenerationError(RuntimeError):
    """A sequence failed inside the engine (not the client's fault)."""


class EngineUnavailableError(GenerationError):
    """The engine process stopped (or is restarting); the request may be retried."""


async def events_of(
    request: GenerationRequest, submit: Callable[[Sink], None], abort: Callable[[str], None], wakers: LoopWakers
) -> AsyncGenerator[list[TokenEvent], None]:
    """A request's events as the engine delivers them (`submit` hands the engine the sink), every pending one at
    once, until each of its sequences finished; an error event raises after the events before it were yielded.
    Leaving early aborts the request."""
    loop = asyncio.get_running_loop()
    buffer = EventBuffer(loop, wakers.of(loop))
    submit(buffer.put)
    remaining = request.params.n
    try:
        while remaining:
            events = await buffer.take()
            for k, event in enumerate(events):
                if event.finish_reason is None:
                    continue
                remaining -= 1
                if event.finish_reason == "error":
                    if k:
                        yield events[:k]
                    raise_if_failed(event)
            yield events
    finally:
        if remaining:
            abort(request.request_id)


def collect_events(request: GenerationRequest, submit: Callable[[Sink], None], timeout: float) -> list[TokenEvent]:
    """Every event of a request, blocking (scripts and tests); an error event raises."""
    events: queue.Queue[list[TokenEvent]] = queue.Queue()
    submit(events.put)
    out: list[TokenEvent] = []
    remaining = request.params.n
    deadline = time.monotonic() + timeout
    while remaining:
        for event in events.get(timeout=max(0.0, deadline - time.monotonic())):
            raise_if_failed(event)
            out.append(event)
            remaining -= event.finish_reason is not None
    return out


def raise_if_failed(event: TokenEvent) -> None:
    """Turn an error event into the matching exception (PoolExhaustedError or GenerationError)."""
    if event.finish_reason != "error":
        return
    if event.error_kind == "pool_exhausted":
        raise PoolExhaustedError(event.error or "KV pool exhausted")
    if event.error_kind == "unavailable":
        raise EngineUnavailableError(event.error or "the engine is unavailable")
    raise GenerationError(event.error or "generation failed")
