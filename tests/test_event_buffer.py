"""EventBuffer and LoopWaker: a request's events cross from engine threads to the event loop in order, each
once, taken all at once; a step's wake-ups of one loop are one `call_soon_threadsafe`; a cancelled reader loses
nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from server.engine.event_buffer import EventBuffer, LoopWaker, LoopWakers
from server.engine.request import TokenEvent


def _event(n: int) -> TokenEvent:
    return TokenEvent(request_id="r", index=0, token_id=n, text=str(n))


def _buffer(loop: asyncio.AbstractEventLoop) -> EventBuffer:
    return EventBuffer(loop, LoopWaker(loop))


def _counting(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Count the loop's `call_soon_threadsafe` calls (the wake-ups other threads ask for)."""
    calls: list[int] = []
    original = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return calls


def test_a_producer_thread_batches_arrive_once_in_order() -> None:
    batches, total = 1000, 0
    sizes = [1 + i % 3 for i in range(batches)]
    total = sum(sizes)

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        buffer = _buffer(loop)

        def produce() -> None:
            n = 0
            for i, size in enumerate(sizes):
                buffer.put([_event(n + k) for k in range(size)])
                n += size
                if i % 50 == 0:
                    time.sleep(0.001)  # let the reader catch up now and then: both paths (waiting, not) run

        thread = threading.Thread(target=produce)
        thread.start()
        seen: list[int] = []
        takes = 0
        while len(seen) < total:
            events = await asyncio.wait_for(buffer.take(), timeout=10)
            assert events, "a take returns only when there is something"
            takes += 1
            seen += [e.token_id for e in events if e.token_id is not None]
            if takes % 7 == 0:
                await asyncio.sleep(0.0005)  # a busy reader: events pile up meanwhile
        thread.join()
        return seen, takes

    seen, takes = asyncio.run(main())
    assert seen == list(range(total))
    assert takes < batches  # a reader that was busy took several batches at once


def test_a_take_returns_every_pending_event_at_once() -> None:
    async def main() -> list[list[int]]:
        buffer = _buffer(asyncio.get_running_loop())
        buffer.put([_event(0), _event(1)])
        buffer.put([_event(2)])
        first = await buffer.take()
        buffer.put([_event(3)])
        second = await buffer.take()
        return [[e.token_id or 0 for e in first], [e.token_id or 0 for e in second]]

    assert asyncio.run(main()) == [[0, 1, 2], [3]]


def test_a_steps_wake_ups_on_one_loop_are_one_callback() -> None:
    readers = 64

    async def main() -> tuple[int, list[list[int]]]:
        loop = asyncio.get_running_loop()
        waker = LoopWaker(loop)
        buffers = [EventBuffer(loop, waker) for _ in range(readers)]
        tasks = [asyncio.ensure_future(b.take()) for b in buffers]
        await asyncio.sleep(0.01)  # every reader waits on its future now
        calls = _counting(loop)

        def step() -> None:  # one engine step: every request's events, from another thread
            for i, buffer in enumerate(buffers):
                buffer.put([_event(i)])

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()  # blocks the loop: every put lands before it runs a callback
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        return len(calls), [[e.token_id or 0 for e in r] for r in results]

    wakeups, results = asyncio.run(main())
    assert results == [[i] for i in range(readers)]
    assert wakeups == 1


def test_the_next_step_wakes_again() -> None:
    """After the loop ran its callback, the next step's wake-up asks for a new one (none is lost)."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        waker = LoopWaker(loop)
        buffer = EventBuffer(loop, waker)
        calls = _counting(loop)
        for n in range(5):
            task = asyncio.ensure_future(buffer.take())
            await asyncio.sleep(0)
            thread = threading.Thread(target=buffer.put, args=([_event(n)],))
            thread.start()
            thread.join()
            assert [e.token_id for e in await asyncio.wait_for(task, timeout=5)] == [n]
        return len(calls)

    assert asyncio.run(main()) == 5


def test_a_cancelled_take_loses_no_later_events() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        buffer = _buffer(loop)
        waiting = asyncio.ensure_future(buffer.take())
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        thread = threading.Thread(target=buffer.put, args=([_event(1), _event(2)],))
        thread.start()
        thread.join()
        events = await asyncio.wait_for(buffer.take(), timeout=5)
        return [e.token_id or 0 for e in events]

    assert asyncio.run(main()) == [1, 2]


def test_a_take_cancelled_after_its_wake_up_leaves_the_events_for_the_next() -> None:
    """The put woke the reader, but it was cancelled before it ran: the events stay for the next take."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        buffer = _buffer(loop)
        waiting = asyncio.ensure_future(buffer.take())
        await asyncio.sleep(0.01)
        thread = threading.Thread(target=buffer.put, args=([_event(7)],))
        thread.start()
        thread.join()  # the wake-up is scheduled, not run
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        buffer.put([_event(8)])
        events = await asyncio.wait_for(buffer.take(), timeout=5)
        return [e.token_id or 0 for e in events]

    assert asyncio.run(main()) == [7, 8]


def test_one_waker_per_loop() -> None:
    wakers = LoopWakers()
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert wakers.of(first) is wakers.of(first)
        assert wakers.of(first) is not wakers.of(second)
    finally:
        first.close()
        second.close()
