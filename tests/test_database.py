"""server/persistence: migrations, atomic transactions and concurrent writers, on SQLite and PostgreSQL alike.

Every test runs twice: on the embedded SQLite file and on a real PostgreSQL
server that the test session starts (tests/services.py). "Two replicas" are two
Database objects on one database, as two server processes would hold.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.persistence.database import Database, Schema, SqliteDatabase, open_database

ITEMS = Schema("items", (("CREATE TABLE IF NOT EXISTS items (id AUTO_ID, name TEXT NOT NULL)",),))
ITEMS_V2 = Schema(
    "items",
    (*ITEMS.versions, ("ALTER TABLE items ADD COLUMN size BIGINT NOT NULL DEFAULT 0",)),
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str | None:
    """None: SQLite in the test's directory; else a fresh PostgreSQL database's URL."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else None


@pytest.fixture
def replicas(url: str | None, tmp_path: Path) -> Iterator[list[Database]]:
    """Two handles on one database (the first is the test's `db`)."""
    handles = [open_database(url, tmp_path), open_database(url, tmp_path)]
    yield handles
    for handle in handles:
        handle.close()


@pytest.fixture
def db(replicas: list[Database]) -> Database:
    return replicas[0]


def test_migrate_applies_each_version_once_and_records_it(db: Database) -> None:
    assert db.migrate(ITEMS) == [1]
    assert db.migrate(ITEMS) == []
    db.execute("INSERT INTO items (name) VALUES (?)", ("a",))
    assert db.migrate(ITEMS_V2) == [2]
    assert db.migrate(ITEMS_V2) == []
    row = db.query_one("SELECT name, size FROM items")
    assert row is not None and (row["name"], row["size"]) == ("a", 0)
    assert (row[0], row[1]) == ("a", 0)  # by position as well as by name
    versions = db.query_one("SELECT version FROM schema_versions WHERE name = ?", ("items",))
    assert versions is not None and versions["version"] == 2


def test_a_database_newer_than_the_server_is_refused(db: Database) -> None:
    db.migrate(ITEMS_V2)
    with pytest.raises(RuntimeError, match="newer than this server"):
        db.migrate(ITEMS)


def test_two_replicas_starting_at_once_migrate_once(replicas: list[Database]) -> None:
    applied: list[list[int]] = []
    start = threading.Barrier(len(replicas))

    def start_replica(handle: Database) -> None:
        start.wait()
        applied.append(handle.migrate(ITEMS_V2))

    threads = [threading.Thread(target=start_replica, args=(h,)) for h in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(applied) == [[], [1, 2]]


def test_data_survives_reopening(url: str | None, tmp_path: Path) -> None:
    first = open_database(url, tmp_path)
    first.migrate(ITEMS)
    first.execute("INSERT INTO items (name) VALUES (?)", ("kept",))
    first.close()
    again = open_database(url, tmp_path)
    try:
        assert [r["name"] for r in again.query("SELECT name FROM items")] == ["kept"]
    finally:
        again.close()


def test_transaction_rolls_back_on_error(db: Database) -> None:
    db.migrate(ITEMS)
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO items (name) VALUES ('lost')")
            raise RuntimeError("boom")
    row = db.query_one("SELECT COUNT(*) AS n FROM items")
    assert row is not None and row["n"] == 0


def test_writers_of_two_replicas_serialize(replicas: list[Database]) -> None:
    """Read-modify-write inside a transaction (the stores' next `seq`) never hands out one number twice."""
    replicas[0].migrate(ITEMS)

    def write(handle: Database, worker: int) -> None:
        for i in range(25):
            with handle.transaction() as conn:
                n = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                conn.execute("INSERT INTO items (name) VALUES (?)", (f"{n}",))

    threads = [threading.Thread(target=write, args=(replicas[w % 2], w)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [r["name"] for r in replicas[1].query("SELECT name FROM items")]
    assert sorted(names, key=int) == [str(i) for i in range(150)]


def test_placeholders_and_literal_text(db: Database) -> None:
    """`?` outside quotes is a parameter; '?' and '%' inside text are text (PostgreSQL's driver spells both
    differently)."""
    db.migrate(ITEMS)
    db.execute("INSERT INTO items (name) VALUES ('100% sure?')")
    db.execute("INSERT INTO items (name) VALUES (?)", ("it's 50%?",))
    rows = db.query("SELECT name FROM items WHERE name LIKE '%?' AND name <> ? ORDER BY id", ("none",))
    assert [r["name"] for r in rows] == ["100% sure?", "it's 50%?"]
    with db.transaction() as conn:
        conn.executemany("INSERT INTO items (name) VALUES (?)", [("x",), ("y",)])
    assert db.query_one("SELECT COUNT(*) FROM items WHERE name IN (?, ?)", ("x", "y"))[0] == 2  # type: ignore[index]


def test_sqlite_is_the_default(tmp_path: Path) -> None:
    db = open_database(None, tmp_path)
    assert isinstance(db, SqliteDatabase) and not db.shared and (tmp_path / "mlx-dropin.sqlite3").is_file()
    db.close()


def test_an_unreachable_postgresql_is_one_clear_error(tmp_path: Path) -> None:
    from server.persistence.database import DatabaseUnavailable
    from server.persistence.postgres import PostgresDatabase

    with pytest.raises(DatabaseUnavailable, match="cannot connect") as caught:
        PostgresDatabase("postgresql://someone:s3cret@127.0.0.1:9/nowhere?connect_timeout=1", connect_timeout_s=2)
    assert "s3cret" not in str(caught.value)


def test_a_starting_replica_sweeps_only_old_partial_uploads(url: str | None, tmp_path: Path) -> None:
    """A crash's leftover upload is removed at start; a younger one may be another replica's upload in
    progress in the shared directory, and stays."""
    import os
    import time

    from server.persistence.files import PARTIAL_MAX_AGE_S, FileStore

    root = tmp_path / "files"
    root.mkdir()
    old, young = root / "file-old.partial", root / "file-young.partial"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    then = time.time() - PARTIAL_MAX_AGE_S - 60
    os.utime(old, (then, then))
    db = open_database(url, tmp_path)
    try:
        FileStore(db, root)
    finally:
        db.close()
    assert not old.exists() and young.exists()
