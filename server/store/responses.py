"""Stored responses: each with its owner (the API key's tenant), its date, the response as answered, its input
items and the whole conversation a later ``previous_response_id`` continues.

A response is visible only to its owner (``None``: the one caller of a server with no key or one key). One
older than ``response_ttl_s`` is gone (never read; deleted by the next write); storing one more than
``max_responses_per_key`` for an owner drops that owner's oldest. The write and the drops are one transaction:
when it fails, nothing already stored is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.store.backend import Transaction, owner_column
from server.store.config import StoreConfig
from server.store.database import Database

Item = dict[str, Any]


@dataclass(frozen=True)
class StoredResponse:
    id: str
    owner: str | None
    created_at: float
    response: dict[str, Any]
    """The response object as it was answered."""
    input_items: list[Item]
    """This request's input items (``GET /v1/responses/{id}/input_items``)."""
    conversation: list[Item]
    """Every item of the conversation so far: the previous response's conversation, this input, this output."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResponseStore:
    """The stored responses in ``database`` (see the module docstring)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.config: StoreConfig = database.config

    def now(self) -> float:
        """The store's clock (responses are dated and expired by it)."""
        return self.config.clock()

    def _oldest_kept(self) -> float | None:
        ttl = self.config.response_ttl_s
        return None if ttl is None else self.now() - ttl

    async def save(self, record: StoredResponse) -> None:
        """Store ``record``, dropping expired responses and the owner's oldest beyond the cap (StoreError when the
        database fails: then nothing changed)."""
        oldest, cap = self._oldest_kept(), self.config.max_responses_per_key
        owner = owner_column(record.owner)
        row = (record.id, owner, record.created_at, _json(record.response), _json(record.input_items), _json(record.conversation))

        def write(tx: Transaction) -> None:
            tx.execute(
                "INSERT INTO responses (id, owner, created_at, response, input_items, conversation) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            if oldest is not None:
                tx.execute("DELETE FROM responses WHERE created_at < ?", (oldest,))
            count = tx.execute("SELECT COUNT(*) FROM responses WHERE owner = ?", (owner,))[0][0]
            if count > cap:
                tx.execute(
                    "DELETE FROM responses WHERE seq IN (SELECT seq FROM responses WHERE owner = ? ORDER BY seq LIMIT ?)",
                    (owner, count - cap),
                )

        await self.database.run(write)

    async def load(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """``owner``'s response ``response_id``; None when there is none (another owner's, expired, deleted)."""
        oldest = self._oldest_kept()
        where, params = _visible(response_id, owner, oldest)

        def read(tx: Transaction) -> list[tuple[Any, ...]]:
            return tx.execute(f"SELECT created_at, response, input_items, conversation FROM responses WHERE {where}", params)

        rows = await self.database.run(read)
        if not rows:
            return None
        created_at, response, input_items, conversation = rows[0]
        return StoredResponse(
            response_id, owner, float(created_at), json.loads(response), json.loads(input_items), json.loads(conversation)
        )

    async def delete(self, response_id: str, owner: str | None) -> bool:
        """Delete ``owner``'s response ``response_id``; whether there was one."""
        where, params = _visible(response_id, owner, self._oldest_kept())

        def remove(tx: Transaction) -> bool:
            found = tx.execute(f"SELECT seq FROM responses WHERE {where}", params)
            if found:
                tx.execute("DELETE FROM responses WHERE seq = ?", (found[0][0],))
            return bool(found)

        return await self.database.run(remove)

    async def count(self, owner: str | None) -> int:
        """How many responses ``owner`` has stored (expired ones not yet deleted included)."""

        def read(tx: Transaction) -> int:
            return int(tx.execute("SELECT COUNT(*) FROM responses WHERE owner = ?", (owner_column(owner),))[0][0])

        return await self.database.run(read)


def _visible(response_id: str, owner: str | None, oldest: float | None) -> tuple[str, tuple[Any, ...]]:
    where = "id = ? AND owner = ?"
    params: tuple[Any, ...] = (response_id, owner_column(owner))
    if oldest is not None:
        where += " AND created_at >= ?"
        params += (oldest,)
    return where, params


def open_response_store(config: StoreConfig) -> ResponseStore:
    """The response store of ``config``'s database (connected at its first call, or by ``database.open()``)."""
    return ResponseStore(Database(config))
