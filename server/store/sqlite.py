"""The SQLite backend (stdlib ``sqlite3``): a file under ``--data-dir`` in WAL mode, or a database in memory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.store.backend import Row

BUSY_TIMEOUT_S = 10.0
"""How long a write waits for another process's (another server on the same file) before it fails."""
MEMORY = ":memory:"


class SqliteBackend:
    """One connection to ``path`` (``:memory:``: a private database in memory). A file's folder is created when
    missing; the file is put in WAL mode (readers never wait for the writer, several servers can share it)."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level None: no implicit transactions; ours are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        if path != MEMORY:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"the database {path} cannot be put in WAL mode (it is in {mode!r} mode)")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint, safe against corruption

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[SqliteBackend]:
        self._conn.execute("BEGIN IMMEDIATE")  # the write lock at once: no deadlock upgrading a read
        try:
            yield self
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def lock_schema(self, tx: Any) -> None:
        """BEGIN IMMEDIATE already holds the database's write lock."""

    @property
    def broken(self) -> bool:
        return False

    def close(self) -> None:
        self._conn.close()
