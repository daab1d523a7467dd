"""The PostgreSQL backend (psycopg 3): one connection to ``--database-url``, shared by no one else in this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from server.store.backend import Row

CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK = 0x616D756C6574  # pg_advisory_xact_lock key of the schema migrations ("amulet")


class PostgresBackend:
    """A connection in autocommit mode whose transactions are explicit (:meth:`transaction`)."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="amulet-serve")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = self._conn.execute(sql.replace("?", "%s"), tuple(params))
        return list(cursor.fetchall()) if cursor.description is not None else []

    @contextmanager
    def transaction(self) -> Iterator[PostgresBackend]:
        with self._conn.transaction():
            yield self

    def lock_schema(self, tx: Any) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    @property
    def broken(self) -> bool:
        return bool(self._conn.closed or self._conn.broken)

    def close(self) -> None:
        self._conn.close()
