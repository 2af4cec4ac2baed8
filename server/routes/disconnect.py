"""Abandoned requests: a non-streamed answer races the client's disconnect.

When the client goes before its JSON answer is ready (a timeout, a killed
process, an SDK retry), nobody will read the answer: the generation task is
cancelled, which closes the engine's stream, whose cleanup aborts the request's
sequences at the engine's next step. The route then ends with a 499 (nginx's
"client closed request"; no one receives it, but the access log and the request
metrics record it), so the middleware gives the key's concurrency slot back at
once. Streamed (SSE) answers watch the same channel in their response
(`routes/event_stream.py`).

The watcher reads the ASGI receive channel only after the route has read the
whole body, so the next message there can only be `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from server.errors import APIError

T = TypeVar("T")


class ClientDisconnectedError(APIError):
    """The client closed the connection before its answer was ready (never seen by it)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


async def disconnected(receive: Receive) -> None:
    """Return once the ASGI server reports that the client went away."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, answer: Awaitable[T]) -> T:
    """`answer`, or ClientDisconnectedError as soon as the client disconnects (cancelling `answer` first, and
    waiting for its cleanup, so the engine's sequences are already being aborted when this raises)."""
    work = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not work.done() and watcher.exception() is None:
            raise ClientDisconnectedError(
                "The client closed the connection before the answer was ready; its generation was stopped."
            )
        return await work  # finished first; or the receive channel failed, and the answer decides alone
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))  # its cleanup (the engine's abort) runs before the route ends
            if not work.cancelled():
                work.exception()  # retrieved: it failed while being cancelled, and nobody waits for it
