"""The server's one database: the interface every store uses, versioned migrations, and the embedded SQLite.

A store (files, fine-tuning jobs, stored responses) declares its tables as a
`Schema`: a list of versions, each a list of DDL statements, applied in order by
`Database.migrate` at start-up. Applied versions are recorded in
`schema_versions`, one row per schema; migrating takes the database's write
lock first, so two replicas starting at once apply each version exactly once
(the second finds it done). A version is never edited once released: a change
is a new version (`ALTER TABLE ...`).

Statements use `?` placeholders and SQL both engines speak; DDL writes
`AUTO_ID` for an auto-incrementing integer key, which each engine spells its
own way. Rows read by name (`row["id"]`) or position (`row[0]`).

Two implementations: `SqliteDatabase` (`<data-dir>/mlx-dropin.sqlite3`, the
default: one server) and `PostgresDatabase` (`server/persistence/postgres.py`,
`--database-url postgresql://...`: replicas sharing one state). Both behave
the same: reads never block; `transaction()` is one writer at a time
(SQLite's `BEGIN IMMEDIATE`, PostgreSQL's transaction-scoped advisory lock),
committed atomically or rolled back, so a crash (kill -9) leaves either the
old state or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
FILENAME = "mlx-dropin.sqlite3"
DATABASE_URL_VARIABLE = "MLX_DROPIN_DATABASE_URL"  # also how a training worker learns a shared database

Params = Sequence[Any] | dict[str, Any]

VERSIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_versions (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    migrated_at BIGINT NOT NULL
)"""


class DatabaseUnavailable(Exception):
    """The database cannot be reached or opened (the message names it without credentials)."""


@dataclass(frozen=True)
class Schema:
    """A store's tables: `versions[i]` holds the DDL statements that take the schema from version i to i + 1."""

    name: str
    versions: tuple[tuple[str, ...], ...]


class Row(Protocol):
    """A result row: by column name or by position."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    """What a statement inside a transaction returns."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The connection a transaction hands its body."""

    def execute(self, sql: str, params: Params = ()) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Params]) -> Cursor: ...


class Database:
    """What every store uses; `SqliteDatabase` and `PostgresDatabase` implement it."""

    #: True when other server processes (replicas) share this database's state.
    shared: bool = False
    #: The engine's name, for logs and /metrics.
    engine: str = ""

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """One writer at a time: everything inside commits together, or nothing does (on any exception)."""
        raise NotImplementedError

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        raise NotImplementedError

    def query_one(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Params = ()) -> int:
        """One write statement in its own transaction; returns the rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def ddl(self, statement: str) -> str:
        """A schema statement in this engine's spelling."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where the data lives, without credentials (for the start-up log)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def migrate(self, schema: Schema) -> list[int]:
        """Bring `schema` to its newest version; returns the versions this call applied (none when current)."""
        with self.transaction() as conn:
            conn.execute(self.ddl(VERSIONS_TABLE))
            row = conn.execute("SELECT version FROM schema_versions WHERE name = ?", (schema.name,)).fetchone()
            current = int(row[0]) if row is not None else 0
            if current > len(schema.versions):
                raise RuntimeError(
                    f"the database's {schema.name!r} tables are at version {current}, newer than this server "
                    f"knows ({len(schema.versions)}): a newer release migrated it; run that release"
                )
            applied = list(range(current + 1, len(schema.versions) + 1))
            for version in applied:
                for statement in schema.versions[version - 1]:
                    conn.execute(self.ddl(statement))
            if applied:
                now = int(time.time())
                if row is None:
                    conn.execute(
                        "INSERT INTO schema_versions (name, version, migrated_at) VALUES (?, ?, ?)",
                        (schema.name, applied[-1], now),
                    )
                else:
                    conn.execute(
                        "UPDATE schema_versions SET version = ?, migrated_at = ? WHERE name = ?",
                        (applied[-1], now, schema.name),
                    )
        if applied:
            log.info("database: migrated %s from version %d to %d", schema.name, applied[0] - 1, applied[-1])
        return applied


class SqliteDatabase(Database):
    """One SQLite file: connections per thread (sqlite3 objects must not cross threads), WAL mode and a busy
    timeout, so executor threads, the training supervisor and readers never see "database is locked" under
    normal load."""

    engine = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connection().execute("PRAGMA journal_mode=WAL")  # persistent; outside any transaction

    @classmethod
    def in_dir(cls, data_dir: Path) -> SqliteDatabase:
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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception); writers serialize here."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        return self._connection().execute(sql, params).fetchall()

    def ddl(self, statement: str) -> str:
        return statement.replace("AUTO_ID", "INTEGER PRIMARY KEY AUTOINCREMENT")

    def describe(self) -> str:
        return f"SQLite at {self.path}"

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()


def open_database(url: str | None, data_dir: Path) -> Database:
    """`--database-url` when given (postgresql://...), else the data dir's SQLite file."""
    if not url:
        return SqliteDatabase.in_dir(data_dir)
    from server.persistence.postgres import PostgresDatabase  # psycopg only where PostgreSQL is used

    return PostgresDatabase(url)
