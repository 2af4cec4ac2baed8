"""tests/services.py against the real servers: a PostgreSQL database per test that stores and isolates data, and an
HAProxy that pins each X-Conversation-Id to one backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.services import HAProxy, PostgresServer, find_haproxy, free_port, require_service

CONVERSATION_HEADER = "X-Conversation-Id"


def test_fresh_database_stores_and_reads_back(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE notes (id SERIAL PRIMARY KEY, body TEXT NOT NULL)")
        conn.cursor().executemany("INSERT INTO notes (body) VALUES (%s)", [("first",), ("zweite ✓",)])
        conn.commit()
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT id, body FROM notes ORDER BY id").fetchall()
    assert rows == [(1, "first"), (2, "zweite ✓")]


def test_server_runs_with_the_throwaway_settings(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()
            for name in ("fsync", "synchronous_commit", "full_page_writes", "max_connections", "server_encoding")
        }
    assert settings == {
        "fsync": ("off",),
        "synchronous_commit": ("off",),
        "full_page_writes": ("off",),
        "max_connections": ("200",),
        "server_encoding": ("UTF8",),
    }


def test_databases_are_isolated(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database("isolation_first")
    second = postgres_server.create_database("isolation_second")
    try:
        assert first != second
        with psycopg.connect(first) as conn:
            conn.execute("CREATE TABLE only_here (x INT)")
            conn.execute("INSERT INTO only_here VALUES (1)")
        with psycopg.connect(second) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
        with psycopg.connect(first) as conn:
            assert conn.execute("SELECT x FROM only_here").fetchall() == [(1,)]
    finally:
        postgres_server.drop_database("isolation_first")
        postgres_server.drop_database("isolation_second")


def test_create_database_rejects_a_name_that_is_not_a_plain_identifier(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="database name"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


def test_stop_ends_the_server_and_removes_its_files(tmp_path: Path) -> None:
    server = PostgresServer.start(tmp_path)
    try:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not server.pgdata.exists()
    server.stop()  # idempotent


class NamedBackend(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every GET with its own name."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(("127.0.0.1", 0), NameHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class NameHandler(BaseHTTPRequestHandler):
    server: NamedBackend

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    servers = [NamedBackend("alpha"), NamedBackend("beta")]
    threads = [threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def haproxy_binary() -> None:
    if find_haproxy() is None:
        require_service("haproxy")


def sticky_config(frontend_port: int, backends: list[NamedBackend]) -> str:
    servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port}" for b in backends)
    return f"""\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend conversations
    bind 127.0.0.1:{frontend_port}
    default_backend engines

backend engines
    balance hdr({CONVERSATION_HEADER})
    hash-type consistent
{servers}
"""


@pytest.mark.usefixtures("haproxy_binary")
def test_haproxy_pins_each_conversation_to_one_backend(backends: list[NamedBackend], tmp_path: Path) -> None:
    proxy = HAProxy.start(sticky_config(free_port(), backends), tmp_path)
    try:
        answered_by: dict[str, set[str]] = {}
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for i in range(20):
                conversation = f"conversation-{i % 5}"
                response = client.get("/", headers={CONVERSATION_HEADER: conversation})
                assert response.status_code == 200
                answered_by.setdefault(conversation, set()).add(response.text)
            # Without the header HAProxy falls back to round robin: still answered, and by both backends.
            anonymous = {client.get("/").text for _ in range(4)}
    finally:
        proxy.stop()
    assert len(answered_by) == 5
    assert all(len(names) == 1 for names in answered_by.values()), answered_by
    assert anonymous == {"alpha", "beta"}
    assert proxy.process.poll() is not None


@pytest.mark.usefixtures("haproxy_binary")
def test_haproxy_start_reports_a_bad_config(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="haproxy exited"):
        HAProxy.start(f"frontend broken\n    bind 127.0.0.1:{free_port()}\n    no_such_keyword\n", tmp_path)


def test_require_service_skips_unless_services_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX_DROPIN_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y haproxy"):
        require_service("haproxy")
    monkeypatch.setenv("MLX_DROPIN_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y postgresql"):
        require_service("postgresql")
