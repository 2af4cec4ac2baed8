"""PostgresDatabase: the `Database` interface on PostgreSQL (psycopg 3 and its connection pool), for replicas.

Several server processes on several machines point `--database-url` at one
PostgreSQL and see one world: files, fine-tuning jobs, their events and
models, stored responses. Behaviour matches `SqliteDatabase`: reads run on
their own (autocommit), and `transaction()` takes a transaction-scoped
advisory lock first, so writers serialize across every replica exactly as
SQLite's `BEGIN IMMEDIATE` serializes them in one process. The stores'
read-modify-write steps (the next `seq`, a tenant's quota, a job's status
change) therefore stay atomic without per-store locking.

Statements arrive in the stores' SQLite-style spelling (`?` placeholders) and
are translated once per statement text.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from server.persistence.database import Connection, Cursor, Database, DatabaseUnavailable, Params, Row, Schema

WRITE_LOCK = 0x6D6C_782D_6472_6F70  # "mlx-drop": the one advisory lock key every writer takes
CONNECT_TIMEOUT_S = 15.0
POOL_MAX = 16


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """`?` placeholders (outside quoted text) become psycopg's `%s`; a literal `%` becomes `%%`."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PostgresRow:
    """A row readable by column name or position, like sqlite3.Row."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._names[key]] if isinstance(key, str) else self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PostgresRow({dict(zip(self._names, self._values, strict=True))!r})"


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PostgresRow(names, values)


class _Connection:
    """A pooled connection inside a transaction, speaking the stores' statement spelling."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        return self._conn.execute(translate(sql), params)

    def executemany(self, sql: str, params: Sequence[Params]) -> Cursor:
        cursor = self._conn.cursor()
        cursor.executemany(translate(sql), params)
        return cursor


def redacted(url: str) -> str:
    """The URL's database, host, port and user, never its password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "PostgreSQL (an unreadable --database-url)"
    where = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}"
    return f"PostgreSQL database {parts.get('dbname') or '?'!s} at {where} as {parts.get('user') or '?'!s}"


class PostgresDatabase(Database):
    """A pool of connections to one PostgreSQL database."""

    engine = "postgresql"
    shared = True

    def __init__(
        self, url: str, *, max_connections: int = POOL_MAX, connect_timeout_s: float = CONNECT_TIMEOUT_S
    ) -> None:
        self._where = redacted(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise DatabaseUnavailable(f"--database-url is not a PostgreSQL connection URL: {exc}") from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "row_factory": _row_factory},
            check=ConnectionPool.check_connection,
            timeout=connect_timeout_s * 2,
            open=False,
            name="mlx-dropin",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout:
            self._pool.close()
            raise DatabaseUnavailable(
                f"cannot connect to the {self._where} within {connect_timeout_s:.0f} s "
                "(is it running, and does it accept this user?)"
            ) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _Connection(conn)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._pool.connection() as conn:
            return conn.execute(translate(sql), params).fetchall()

    def migrate(self, schema: Schema) -> list[int]:
        try:
            return super().migrate(schema)
        except psycopg.Error as exc:  # unreachable, or this user may not create tables
            raise DatabaseUnavailable(f"migrating {schema.name!r} on the {self._where} failed: {exc}") from None

    def ddl(self, statement: str) -> str:
        return statement.replace("AUTO_ID", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")

    def describe(self) -> str:
        return self._where

    def close(self) -> None:
        self._pool.close()
