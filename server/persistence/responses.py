"""Persistence of stored responses and their input items, per tenant.

A row keeps the response object as returned (`body`), the conversation before
its input (`history`, the chain it continues, so deleting an earlier response
never breaks a later one) and the conversation key that pins the chain's KV in
the engine. Input items are rows of their own, paged by item id. Every read and
delete names the tenant: another API key's response does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from server.persistence.database import Database, Schema
from server.wire.responses import Item, ItemList, Response

SCHEMA = Schema(
    "responses",
    (
        (
            """CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        conversation TEXT NOT NULL,
        history TEXT NOT NULL,
        body TEXT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS responses_by_tenant ON responses (tenant, created_at)",
            """CREATE TABLE IF NOT EXISTS response_input_items (
        response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
        position BIGINT NOT NULL,
        id TEXT NOT NULL,
        item TEXT NOT NULL,
        PRIMARY KEY (response_id, position))""",
        ),
    ),
)

_items = msgspec.json.Decoder(list[Item])
_item = msgspec.json.Decoder(Item)


class _Output(msgspec.Struct):
    output: list[Item]


_output = msgspec.json.Decoder(_Output)


@dataclass(frozen=True)
class StoredResponse:
    """What continuing a response needs: its conversation key and every item of its conversation."""

    id: str
    conversation: str
    history: list[Item]
    input: list[Item]
    output: list[Item]

    @property
    def items(self) -> list[Item]:
        """The conversation through this response's output: what a follow-up continues."""
        return [*self.history, *self.input, *self.output]


class ResponseStore:
    def __init__(self, database: Database) -> None:
        self.database = database
        database.migrate(SCHEMA)

    def save(
        self, tenant: str, response: Response, conversation: str, history: list[Item], input_items: list[Item]
    ) -> None:
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO responses (id, tenant, created_at, conversation, history, body) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    response.id,
                    tenant,
                    response.created_at,
                    conversation,
                    msgspec.json.encode(history).decode(),
                    msgspec.json.encode(response).decode(),
                ),
            )
            conn.executemany(
                "INSERT INTO response_input_items (response_id, position, id, item) VALUES (?, ?, ?, ?)",
                [(response.id, i, item.id, msgspec.json.encode(item).decode()) for i, item in enumerate(input_items)],
            )

    def body(self, tenant: str, response_id: str) -> bytes | None:
        """The response object's JSON as it was returned."""
        row = self.database.query_one("SELECT body FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant))
        return row["body"].encode() if row is not None else None

    def load(self, tenant: str, response_id: str) -> StoredResponse | None:
        row = self.database.query_one(
            "SELECT conversation, history, body FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant)
        )
        if row is None:
            return None
        inputs = self.database.query(
            "SELECT item FROM response_input_items WHERE response_id = ? ORDER BY position", (response_id,)
        )
        return StoredResponse(
            response_id,
            row["conversation"],
            _items.decode(row["history"]),
            [_item.decode(r["item"]) for r in inputs],
            _output.decode(row["body"]).output,
        )

    def delete(self, tenant: str, response_id: str) -> bool:
        return self.database.execute("DELETE FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant)) > 0

    def input_items(
        self, tenant: str, response_id: str, *, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> ItemList | None:
        """One page of a response's input items; None when the response is unknown.

        Raises ValueError when `after` is not one of its items."""
        if (
            self.database.query_one("SELECT 1 FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant))
            is None
        ):
            return None
        descending = order == "desc"
        bound = None
        if after is not None:
            row = self.database.query_one(
                "SELECT position FROM response_input_items WHERE response_id = ? AND id = ?", (response_id, after)
            )
            if row is None:
                raise ValueError(f"'{after}' is not an input item of response '{response_id}'")
            bound = row["position"]
        where = "" if bound is None else ("AND position < ?" if descending else "AND position > ?")
        rows = self.database.query(
            f"SELECT item FROM response_input_items WHERE response_id = ? {where} "
            f"ORDER BY position {'DESC' if descending else 'ASC'} LIMIT ?",
            (response_id, *(() if bound is None else (bound,)), limit + 1),
        )
        items = [_item.decode(r["item"]) for r in rows[:limit]]
        return ItemList(
            data=items,
            first_id=items[0].id if items else None,
            last_id=items[-1].id if items else None,
            has_more=len(rows) > limit,
        )
