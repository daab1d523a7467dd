"""What a database backend offers the store: transactions of plain SQL with ``?`` placeholders."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

Row = tuple[Any, ...]


def owner_column(owner: str | None) -> str:
    """The ``owner`` column of a stored record: its API key's tenant, or the empty string for one made without a
    tenant (a keyless server), so that every query can compare the column with ``=``."""
    return "" if owner is None else owner


class Transaction(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement (``?`` placeholders); its rows (none for a statement that returns none)."""
        ...


class Backend(Protocol):
    """One open connection, used from one thread at a time (:class:`~server.store.database.Database`'s)."""

    dialect: str
    """``sqlite`` or ``postgresql`` (the migrations' SQL differs where the two do)."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...

    def lock_schema(self, tx: Transaction) -> None:
        """Hold the schema lock until ``tx`` ends (servers starting together migrate one at a time)."""
        ...

    @property
    def broken(self) -> bool:
        """Whether the connection is lost (the database then opens a new one for its next call)."""
        ...

    def close(self) -> None: ...
