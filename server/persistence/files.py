"""FileStore: uploaded files' bytes in `<data-dir>/files/<id>` and their metadata rows in SQLite.

Writes are crash-safe: the bytes land in a temporary file that is renamed into
place only after they are complete, and the row is inserted after the rename,
so a killed server leaves at worst an orphan temporary file (swept at start once
an hour old: replicas sharing the directory may be writing younger ones),
never a row without its bytes. Every lookup is scoped to the tenant: another
tenant's file id is simply not found.

A storage quota (`quota_bytes`, from --max-storage-gb-per-tenant) caps the sum of
a tenant's stored files: checked while the bytes stream in and again inside the
transaction that records the row (so concurrent uploads cannot both slip under
it); a refused upload leaves no file and no row.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.persistence.database import Database, Row, Schema

PARTIAL_MAX_AGE_S = 3600.0  # a partial upload this old is a crash's leftover (replicas share the directory)
PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
SCHEMA = Schema(
    "files",
    (
        (
            """CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        seq BIGINT NOT NULL
    )""",
            "CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, seq)",
        ),
    ),
)


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int


class FileTooLargeError(ValueError):
    pass


class StorageQuotaError(ValueError):
    """The upload would take the tenant's stored bytes over its quota."""

    def __init__(self, quota: int, used: int) -> None:
        super().__init__(
            f"This upload would exceed the storage quota of {quota} bytes per tenant "
            f"(--max-storage-gb-per-tenant); {used} bytes are stored now. Delete files to make room."
        )
        self.quota = quota
        self.used = used


class FileStore:
    def __init__(self, database: Database, root: Path) -> None:
        self.db = database
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        database.migrate(SCHEMA)
        stale = time.time() - PARTIAL_MAX_AGE_S
        for leftover in self.root.glob("*.partial"):  # an upload cut short by a crash
            with contextlib.suppress(OSError):  # gone meanwhile: another replica swept it
                if leftover.stat().st_mtime < stale:  # else perhaps another replica's upload in progress
                    leftover.unlink()

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def usage(self, tenant: str) -> int:
        """Bytes of every file the tenant holds (uploads and result files)."""
        row = self.db.query_one(
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS used FROM files WHERE tenant = ?", (tenant,)
        )
        return int(row["used"]) if row is not None else 0

    def add(
        self, tenant: str, filename: str, purpose: str, source: BinaryIO, max_bytes: int, quota_bytes: int | None = None
    ) -> StoredFile:
        """Copy `source` into the store (at most max_bytes, else FileTooLargeError; with a quota, at most
        what the tenant has left, else StorageQuotaError) and record it."""
        room = None if quota_bytes is None else quota_bytes - self.usage(tenant)
        file_id = "file-" + secrets.token_hex(12)
        partial = self.root / f"{file_id}.partial"
        size = 0
        try:
            with partial.open("wb") as out:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLargeError(f"The file is larger than the limit of {max_bytes} bytes.")
                    if room is not None and quota_bytes is not None and size > room:
                        raise StorageQuotaError(quota_bytes, quota_bytes - room)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            partial.rename(self.path(file_id))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        stored = StoredFile(file_id, tenant, filename, purpose, size, int(time.time()))
        try:
            self._record(stored, quota_bytes)
        except BaseException:
            self.path(file_id).unlink(missing_ok=True)
            raise
        return stored

    def _record(self, stored: StoredFile, quota_bytes: int | None) -> None:
        """Insert the row; under a quota, only if the tenant's total still fits (checked in the transaction)."""
        with self.db.transaction() as conn:
            if quota_bytes is not None:
                used = conn.execute(
                    "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM files WHERE tenant = ?", (stored.tenant,)
                ).fetchone()[0]
                if used + stored.bytes > quota_bytes:
                    raise StorageQuotaError(quota_bytes, used)
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM files").fetchone()[0]
            conn.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored.id, stored.tenant, stored.filename, stored.purpose, stored.bytes, stored.created_at, seq),
            )

    def get(self, tenant: str, file_id: str) -> StoredFile | None:
        row = self.db.query_one("SELECT * FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return _stored(row) if row is not None else None

    def page(
        self, tenant: str, *, after: str | None, limit: int, descending: bool, purpose: str | None
    ) -> tuple[list[StoredFile], bool]:
        """One page of the tenant's files in upload order (or reverse) after the file `after`."""
        where, params = ["tenant = ?"], [tenant]
        if purpose:
            where.append("purpose = ?")
            params.append(purpose)
        if after:
            anchor = self.db.query_one("SELECT seq FROM files WHERE id = ? AND tenant = ?", (after, tenant))
            if anchor is not None:
                where.append("seq < ?" if descending else "seq > ?")
                params.append(anchor["seq"])
        order = "DESC" if descending else "ASC"
        rows = self.db.query(
            f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?", (*params, limit + 1)
        )
        return [_stored(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, tenant: str, file_id: str) -> bool:
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount
        if gone:
            self.path(file_id).unlink(missing_ok=True)
        return bool(gone)

    @contextlib.contextmanager
    def open(self, stored: StoredFile) -> Iterator[BinaryIO]:
        with self.path(stored.id).open("rb") as f:
            yield f

    def copy_to(self, stored: StoredFile, destination: Path) -> None:
        shutil.copyfile(self.path(stored.id), destination)


def _stored(row: Row) -> StoredFile:
    return StoredFile(row["id"], row["tenant"], row["filename"], row["purpose"], row["bytes"], row["created_at"])
