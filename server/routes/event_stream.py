"""The ASGI response of every streamed answer: server-sent events written as the engine produces them.

The body is an async iterator of bytes, each item one or more complete SSE events (what one engine
step produced for this request, already encoded by the service). Each item is one write: no task,
timeout scope or re-encoding per chunk. While the body is quiet (a long prompt prefilling, a queue
wait), a comment line goes out every `ping` seconds so proxies keep the connection open.

The response starts (status and headers) with the first write, not before: a request's first write is its
first engine batch (chat.py's `stream`), so admitting a request costs the event loop no socket write, and
a burst of requests reaches the engine sooner. A client that leaves before anything was written ends the
route with a 499, as a non-streamed request's does (`ClientDisconnectedError`: the access log and the
request metrics record it).

When the client disconnects (the ASGI server's `http.disconnect` on the receive channel, read only
after the route read the whole body) the writer is cancelled; closing the body runs the service's
cleanup, which aborts the engine's sequences at its next step. A slow client needs nothing special:
while a write waits for the socket, the engine's events pile up in the request's EventBuffer and the
next item carries all of them (see server/engine/event_buffer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from server.routes.disconnect import ClientDisconnectedError, disconnected

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
PING = b": ping\n\n"


class EventStream(Response):
    """An SSE response over `body` (bytes items, each whole events), with keep-alive comments every `ping` seconds
    of silence (0: none)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None], ping: float) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self.body_iterator = body
        self.ping = ping
        self._last_write = time.monotonic()
        self._lock = asyncio.Lock()  # a ping never lands inside a chunk
        self._started = False  # whether http.response.start went out (with the first write)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(disconnected(receive))
        pinger = asyncio.ensure_future(self._keep_alive(send)) if self.ping > 0 else None
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not writer.done() and watcher.exception() is not None:
                await asyncio.wait((writer,))  # the receive channel failed: no news of the client, keep writing
        finally:
            for task in (watcher, pinger):
                if task is not None:
                    task.cancel()
            if not writer.done():  # the client left (or this response was cancelled): stop, and clean up
                writer.cancel()
                await asyncio.wait((writer,))
        if not self._started and watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            raise ClientDisconnectedError(
                "The client closed the connection before the stream's first event; its generation was stopped."
            )
        if not writer.cancelled():
            writer.result()  # a failure while writing is the route's

    async def _write(self, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator):
            async for data in self.body_iterator:
                await self._send(send, {"type": "http.response.body", "body": data, "more_body": True})
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, message: Message) -> None:
        async with self._lock:
            if not self._started:
                self._started = True
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send(message)
            self._last_write = time.monotonic()

    async def _keep_alive(self, send: Send) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._last_write + self.ping - time.monotonic()))
            if time.monotonic() - self._last_write >= self.ping:
                await self._send(send, {"type": "http.response.body", "body": PING, "more_body": True})
