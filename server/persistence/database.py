"""The server's one SQLite database (`<data-dir>/mlx-dropin.sqlite3`): connections, schema, transactions.

Every component that persists something (files, fine-tuning jobs, stored
responses) declares its tables as a `Schema` and calls `Database.ensure` once
at start-up; statements are idempotent (`CREATE TABLE IF NOT EXISTS`).
Connections are per thread (sqlite3 objects must not cross threads) in WAL
mode with a busy timeout, so the event loop's executor threads, the training
supervisor and readers never see "database is locked" under normal load, and
`transaction()` commits atomically or rolls back: a crash (kill -9) leaves
either the old or the new state, never a torn one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_S = 30.0
FILENAME = "mlx-dropin.sqlite3"


@dataclass(frozen=True)
class Schema:
    """A component's tables and indexes, as idempotent DDL statements."""

    name: str
    statements: tuple[str, ...]


class Database:
    """Thread-safe access to one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connection().execute("PRAGMA journal_mode=WAL")  # persistent; outside any transaction

    @classmethod
    def in_dir(cls, data_dir: Path) -> Database:
        return cls(Path(data_dir) / FILENAME)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def ensure(self, schema: Schema) -> None:
        with self.transaction() as conn:
            for statement in schema.statements:
                conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception); writers serialize here."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        return self._connection().execute(sql, params).fetchone()

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> int:
        """One write statement in its own transaction; returns the rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()
