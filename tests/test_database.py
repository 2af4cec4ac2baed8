"""server/persistence/database.py: schemas, atomic transactions, concurrent writers from threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from server.persistence.database import Database, Schema

ITEMS = Schema("items", ("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",))


def test_ensure_is_idempotent_and_survives_reopen(tmp_path: Path) -> None:
    db = Database.in_dir(tmp_path)
    db.ensure(ITEMS)
    db.ensure(ITEMS)
    db.execute("INSERT INTO items (name) VALUES (?)", ("a",))
    db.close()
    again = Database.in_dir(tmp_path)
    assert [r["name"] for r in again.query("SELECT name FROM items")] == ["a"]


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    db = Database.in_dir(tmp_path)
    db.ensure(ITEMS)
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO items (name) VALUES ('lost')")
            raise RuntimeError("boom")
    assert db.query_one("SELECT COUNT(*) AS n FROM items")["n"] == 0


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    db = Database.in_dir(tmp_path)
    db.ensure(ITEMS)

    def write(worker: int) -> None:
        for i in range(50):
            with db.transaction() as conn:
                conn.execute("INSERT INTO items (name) VALUES (?)", (f"{worker}-{i}",))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.query_one("SELECT COUNT(*) AS n FROM items")["n"] == 400
