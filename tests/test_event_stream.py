"""EventStream, the SSE response of every streamed answer, over real hypercorn: its headers (sent with the first
write), keep-alive comments in silent gaps only (never inside an item, none with ping 0), a body that ends or fails ends the response, and a
client that leaves closes the body (its `finally` runs: that is where the engine's sequences are aborted), and one
that leaves before the first write ends the route with a 499."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.routes.disconnect import ClientDisconnectedError
from server.routes.event_stream import PING, EventStream
from tests.serving import running_server

BIG = 256 * 1024  # bytes of one large item: more than a socket buffer, so a slow reader blocks its write


class Bodies:
    """Body generators of the test app, with what the tests observe of them."""

    def __init__(self) -> None:
        self.closed = threading.Event()  # the endless body's finally ran
        self.raised: list[BaseException] = []  # what the app raised to the ASGI server

    async def gap(self, pause: float) -> AsyncGenerator[bytes, None]:
        yield b"data: first\n\n"
        await asyncio.sleep(pause)
        yield b"data: second\n\n"

    async def big(self, items: int) -> AsyncGenerator[bytes, None]:
        for i in range(items):
            yield b"data: " + str(i).encode() * (BIG // len(str(i))) + b"\n\n"

    async def endless(self) -> AsyncGenerator[bytes, None]:
        self.closed.clear()
        try:
            while True:
                yield b"data: tick\n\n"
                await asyncio.sleep(0.02)
        finally:
            self.closed.set()

    async def late(self, wait: float) -> AsyncGenerator[bytes, None]:
        """Nothing for `wait` seconds (a prompt prefilling), then one event."""
        self.closed.clear()
        try:
            await asyncio.sleep(wait)
            yield b"data: late\n\n"
        finally:
            self.closed.set()

    async def failing(self) -> AsyncGenerator[bytes, None]:
        yield b"data: before\n\n"
        await asyncio.sleep(0.05)
        raise RuntimeError("the body failed after the response started")


@pytest.fixture(scope="module")
def bodies() -> Bodies:
    return Bodies()


@pytest.fixture(scope="module")
def base(bodies: Bodies) -> Iterator[str]:
    async def stream(request: Request) -> Response:
        kind, ping = request.path_params["kind"], float(request.query_params.get("ping", "0"))
        body = {
            "gap": lambda: bodies.gap(float(request.query_params.get("pause", "0.6"))),
            "big": lambda: bodies.big(int(request.query_params.get("items", "8"))),
            "endless": bodies.endless,
            "late": lambda: bodies.late(float(request.query_params.get("wait", "0.5"))),
            "failing": bodies.failing,
        }[kind]()
        return EventStream(body, ping=ping)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    class Recorder:
        """Records what the routes raise to the ASGI server (a failure while writing is the route's)."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                bodies.raised.append(exc)
                raise

    routes = [Route("/health", health), Route("/stream/{kind}", stream)]
    app = Starlette(routes=routes, middleware=[Middleware(Recorder)])
    with running_server(app) as url:
        yield url


def _events(raw: bytes) -> list[bytes]:
    """The stream split into whole events; fails on bytes that are not whole events."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    return [part + b"\n\n" for part in raw[:-2].split(b"\n\n")]


def test_headers(base: str) -> None:
    with httpx.stream("GET", base + "/stream/gap?pause=0", timeout=10) as response:
        response.read()
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"


def test_pings_fill_a_silent_gap_and_the_body_ends_the_response(base: str) -> None:
    response = httpx.get(base + "/stream/gap?pause=0.6&ping=0.1", timeout=10)
    events = _events(response.content)
    assert events[0] == b"data: first\n\n" and events[-1] == b"data: second\n\n"
    pings = events[1:-1]
    assert pings and all(p == PING for p in pings)
    assert 2 <= len(pings) <= 7  # one per 0.1 s of a 0.6 s silence, loosely (a loaded machine sleeps long)


def test_no_pings_while_items_keep_coming(base: str) -> None:
    """An item every 20 ms keeps a 100 ms keep-alive quiet."""
    lines = []
    with httpx.stream("GET", base + "/stream/endless?ping=0.1", timeout=10) as response:
        deadline = time.monotonic() + 0.6
        for line in response.iter_lines():
            lines.append(line)
            if time.monotonic() > deadline:
                break
    assert lines.count("data: tick") >= 10
    assert not [line for line in lines if line.startswith(":")]


def test_ping_zero_sends_none(base: str) -> None:
    response = httpx.get(base + "/stream/gap?pause=0.5&ping=0", timeout=10)
    assert _events(response.content) == [b"data: first\n\n", b"data: second\n\n"]


@pytest.mark.parametrize("http2", [False, True])
def test_a_ping_never_lands_inside_an_item(base: str, http2: bool) -> None:
    """A slow reader: each large item's write waits for the socket (HTTP/2: for flow-control window) far longer
    than `ping`; pings may come between items, never inside one."""
    items = 8
    raw = b""
    with httpx.Client(http1=not http2, http2=http2, timeout=30) as client:
        with client.stream("GET", base + f"/stream/big?items={items}&ping=0.01") as response:
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            for piece in response.iter_raw(16 * 1024):
                raw += piece
                time.sleep(0.005)
    data = [e for e in _events(raw) if e != PING]
    assert data == [b"data: " + str(i).encode() * (BIG // len(str(i))) + b"\n\n" for i in range(items)]


def test_a_client_that_leaves_closes_the_body(base: str, bodies: Bodies) -> None:
    with httpx.stream("GET", base + "/stream/endless?ping=0.05", timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines) == "data: tick"
        assert not bodies.closed.is_set()
    assert bodies.closed.wait(5), "the body kept running after its client left"


def test_the_response_starts_with_its_first_write(base: str) -> None:
    """No status or headers before the body's first item (or a keep-alive comment): admitting a request writes
    nothing to its socket."""
    for ping, least in ((0.0, 0.45), (0.1, 0.08)):
        started = time.monotonic()
        with httpx.stream("GET", base + f"/stream/late?wait=0.5&ping={ping}", timeout=10) as response:
            headers_after = time.monotonic() - started
            raw = response.read()
        assert response.status_code == 200 and headers_after >= least, (ping, headers_after)
        assert headers_after < 0.45 or not ping  # with keep-alives, the first comment starts the response
        assert _events(raw)[-1] == b"data: late\n\n"


def test_a_client_that_leaves_before_the_first_write_ends_the_route_with_499(base: str, bodies: Bodies) -> None:
    bodies.raised.clear()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting for the response to start
        httpx.get(base + "/stream/late?wait=30&ping=0", timeout=httpx.Timeout(10, read=0.3))
    assert bodies.closed.wait(5), "the body kept running after its client left"
    deadline = time.monotonic() + 5
    while not bodies.raised and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [type(e) for e in bodies.raised] == [ClientDisconnectedError]  # the access log's 499, as for JSON
    assert bodies.raised[0].status == 499  # type: ignore[attr-defined]


def test_a_body_failing_after_the_start_ends_the_response(base: str, bodies: Bodies) -> None:
    bodies.raised.clear()
    started = time.monotonic()
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):  # the chunked body is cut short, not finished cleanly
        with httpx.stream("GET", base + "/stream/failing?ping=0.05", timeout=10) as response:
            for piece in response.iter_raw():
                received += piece
    assert received.startswith(b"data: before\n\n")
    assert time.monotonic() - started < 5
    assert [str(e) for e in bodies.raised] == ["the body failed after the response started"]  # not swallowed


def test_a_ping_waits_for_a_write_in_progress() -> None:
    """ASGI servers may yield inside `send` (a slow socket): a keep-alive never starts while a write is under way
    (with hypercorn a message is written whole, so this drives the response's ASGI calls directly)."""
    written: list[bytes] = []
    overlaps: list[bytes] = []  # writes that began while another was under way
    busy = [False]

    async def send(message: Message) -> None:
        if busy[0]:
            overlaps.append(message.get("body", b""))
        busy[0] = True
        written.append(message.get("body", b""))
        await asyncio.sleep(0.05)  # the socket takes its time
        busy[0] = False

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    async def body() -> AsyncGenerator[bytes, None]:
        for i in range(5):
            yield b"data: %d\n\n" % i

    async def main() -> None:
        await EventStream(body(), ping=0.01)({"type": "http"}, receive, send)

    asyncio.run(main())
    assert not overlaps
    assert PING in written  # writes of 50 ms leave silences longer than 10 ms: pings go out, between them
    assert [b for b in written[1:] if b != PING] == [b"data: %d\n\n" % i for i in range(5)] + [b""]
