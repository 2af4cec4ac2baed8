"""A request's events on their way from the engine to the asyncio task that reads them.

The engine (its thread, its output thread, or the reader of the engine process's pipe) `put`s each
step's events of a request in one call; the reader `take`s everything that arrived since it last
looked, in one list. The event loop is woken only when the reader is waiting, and a step's wake-ups
of all its requests on one loop are one `call_soon_threadsafe` (`LoopWaker`), so a step costs the
event loop one wake-up however many streams it served. A reader that is busy (writing to a slow
client) costs the engine nothing, and when it comes back it gets every pending token at once: its
stream sends them as one chunk instead of falling further behind one chunk per token. What waits is
bounded by the request's own `max_tokens`.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from server.engine.request import TokenEvent


class LoopWaker:
    """Wakes futures of one event loop from other threads: every wake-up asked for until the loop runs its
    callback costs one `call_soon_threadsafe`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Future[None]] = []

    def wake(self, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            self._pending.append(waiter)
            if len(self._pending) > 1:
                return  # the callback is already on its way
        self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for waiter in pending:
            if not waiter.done():
                waiter.set_result(None)


class LoopWakers:
    """One LoopWaker per event loop (an engine may serve several: tests run apps on their own loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()

    def of(self, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        with self._lock:
            waker = self._wakers.get(loop)
            if waker is None:
                waker = self._wakers[loop] = LoopWaker(loop)
            return waker


class EventBuffer:
    """Events of one request, appended from any thread and taken all at once on the event loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, waker: LoopWaker) -> None:
        self._loop = loop
        self._waker = waker
        self._events: list[TokenEvent] = []
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, events: list[TokenEvent]) -> None:
        """Append events (any thread); wake the reader if it waits."""
        with self._lock:
            self._events.extend(events)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._waker.wake(waiter)

    async def take(self) -> list[TokenEvent]:
        """Every event that arrived since the last take, in order; waits while there are none."""
        while True:
            with self._lock:
                if self._events:
                    events, self._events = self._events, []
                    return events
                waiter = self._waiter = self._loop.create_future()
            await waiter
