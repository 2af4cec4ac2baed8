"""What one hop of a request's planning to a worker thread costs: starlette's run_in_threadpool (anyio) against
asyncio's own executor (`server/routes/admission.py` `off_loop`), side by side in one run.

Every generation request plans (chat template, tokenizing, grammar) off the event loop, so a burst of N
requests pays N hops on the loop's thread before any reaches the engine. The planned function here
does nothing: what is timed is the hop alone, for calls made one after another and for N at once.

    .venv/bin/python bench/thread_hop.py --calls 2000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool


def _nothing(x: int) -> int:
    return x


async def _timed(hop: Callable[[], Awaitable[int]], calls: int, together: bool) -> float:
    started = time.perf_counter()
    if together:
        await asyncio.gather(*(hop() for _ in range(calls)))
    else:
        for _ in range(calls):
            await hop()
    return (time.perf_counter() - started) / calls * 1e6


async def _main(calls: int, rounds: int) -> None:
    loop = asyncio.get_running_loop()
    hops: dict[str, Callable[[], Awaitable[int]]] = {
        "run_in_threadpool": lambda: run_in_threadpool(_nothing, 1),
        "run_in_executor": lambda: loop.run_in_executor(None, _nothing, 1),
    }
    for together in (False, True):
        best = {name: min([await _timed(hop, calls, together) for _ in range(rounds)]) for name, hop in hops.items()}
        shape = f"{calls} at once" if together else "one after another"
        print(
            f"{shape:>18}: run_in_threadpool {best['run_in_threadpool']:.1f} us/call, run_in_executor "
            f"{best['run_in_executor']:.1f} us/call ({best['run_in_threadpool'] / best['run_in_executor']:.2f}x)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3, help="best of this many rounds per side")
    args = p.parse_args()
    asyncio.run(_main(args.calls, args.rounds))


if __name__ == "__main__":
    main()
