"""What every generation route does around its service: plan the request off the event loop, charge the key,
time the tokens, and bound a non-streamed answer by --request-timeout and by the client's patience (a
disconnect stops it)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from server.engine import GenerationRequest
from server.errors import GatewayTimeoutError
from server.metrics import TokenTimer
from server.rate_limits import admit, generation_cost
from server.registry import ServedModel
from server.routes.disconnect import unless_disconnected

T = TypeVar("T")


async def off_loop(plan: Callable[..., T], *args: Any) -> T:
    """Run a request's planning (chat template, tokenizing, grammar) on the loop's thread pool.

    asyncio's own executor, not starlette's `run_in_threadpool`: in a burst anyio's hop cost 62 us a call
    on this 2-core machine against 17 (bench/thread_hop.py), paid on the event loop by every request before
    the next is read, and its pool of 40 threads has more of them contend for the GIL with the event loop
    than there are CPUs to run them."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(plan, *args))


def admit_generation(request: Request, served: ServedModel, requests: Sequence[GenerationRequest]) -> TokenTimer:
    """Charge prompt + max_tokens and hold the sequences (or a 429); the timer for the plan's token metrics."""
    admit(request, *generation_cost(requests, served.running_engine.context_length))
    return request.app.state.metrics.generation(served.id, getattr(request.state, "started", None))


async def within_limits(request: Request, answer: Awaitable[T]) -> T:
    """A non-streamed answer: a 504 once --request-timeout passes, a 499 as soon as the client disconnects;
    either way the answer is cancelled, which aborts the engine's sequences at its next step."""
    return await unless_disconnected(request.receive, _within_timeout(request, answer))


async def _within_timeout(request: Request, answer: Awaitable[T]) -> T:
    """The answer, or a 504 once --request-timeout passes (cancelling it aborts the engine's sequences)."""
    timeout: float | None = request.app.state.settings.request_timeout
    if timeout is None:
        return await answer
    try:
        return await asyncio.wait_for(answer, timeout)
    except TimeoutError:
        raise GatewayTimeoutError(
            f"The request did not finish within the server's limit of {timeout:g} seconds "
            f"(--request-timeout). Ask for fewer tokens, or stream the answer."
        ) from None
