"""What every generation route does around its service: name the model, charge the key, time the tokens,
and bound a non-streamed answer by --request-timeout and by the client's patience (a disconnect stops it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from starlette.requests import Request

from server.engine import GenerationRequest
from server.errors import GatewayTimeoutError
from server.metrics import TokenTimer
from server.rate_limits import admit, generation_cost
from server.registry import ServedModel
from server.routes.disconnect import unless_disconnected

T = TypeVar("T")


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
