"""The server's database: one connection on a thread of its own, every call off the event loop.

:meth:`Database.run` runs a function in one transaction on the database's thread (SQLite and psycopg are
blocking; the calls are serialised, as SQLite's writes are anyway). The connection is opened, and the schema
brought up to date (:func:`~server.store.migrations.migrate`), by the first call (or :meth:`Database.open` at
start-up); a lost connection is replaced at the next call. Any failure is a :class:`StoreError`: its cause
goes to the log, the caller gets a stable message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.store.backend import Backend, Transaction
from server.store.config import SQLITE_FILE, StoreConfig
from server.store.migrations import migrate

T = TypeVar("T")
logger = logging.getLogger(__name__)


class StoreError(Exception):
    """The database failed (unreachable, full, locked, a newer schema ...); the server log has the cause."""


def connect(config: StoreConfig) -> Backend:
    """A new connection to the database ``config`` names."""
    if config.database_url is not None:
        from server.store.postgres import PostgresBackend  # psycopg is only loaded for PostgreSQL

        return PostgresBackend(config.database_url)
    from server.store.sqlite import MEMORY, SqliteBackend

    path = MEMORY if config.data_dir is None else os.path.join(os.path.expanduser(config.data_dir), SQLITE_FILE)
    return SqliteBackend(path)


def describe(config: StoreConfig) -> str:
    """Where the database is, for log lines (never the URL: it may hold a password)."""
    if config.backend == "postgresql":
        return "PostgreSQL (--database-url)"
    if config.backend == "sqlite":
        return f"SQLite at {os.path.join(os.path.expanduser(config.data_dir or ''), SQLITE_FILE)}"
    return "memory (not kept across restarts)"


class Database:
    """See the module docstring. ``connect`` opens a new connection (default: :func:`connect` of ``config``)."""

    def __init__(self, config: StoreConfig, open_backend: Callable[[], Backend] | None = None) -> None:
        self.config = config
        self.where = describe(config)
        self._open_backend = open_backend or (lambda: connect(config))
        self._backend: Backend | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="amulet-store")
        self._closed = threading.Event()

    def _connected(self) -> Backend:
        if self._backend is None:
            backend = self._open_backend()
            try:
                applied = migrate(backend, self.config.clock())
            except BaseException:
                backend.close()
                raise
            if applied:
                logger.info("Database in %s: applied schema migrations %s.", self.where, applied)
            self._backend = backend
        return self._backend

    def _call(self, work: Callable[[Transaction], T]) -> T:
        if self._closed.is_set():
            raise StoreError("the database is closed (the server is shutting down)")
        try:
            backend = self._connected()
            with backend.transaction() as tx:
                return work(tx)
        except Exception as exc:
            self._drop_if_broken()
            logger.error("The database in %s failed: %s: %s", self.where, type(exc).__name__, exc)
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    def _drop_if_broken(self) -> None:
        backend = self._backend
        if backend is not None and backend.broken:
            self._backend = None
            try:
                backend.close()
            except Exception:
                logger.debug("Closing a broken database connection failed", exc_info=True)

    async def run(self, work: Callable[[Transaction], T]) -> T:
        """``work(tx)`` in one transaction on the database's thread; StoreError when the database fails."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, work)
        except RuntimeError as exc:  # the executor is shut down: the database was closed
            if not self._closed.is_set():
                raise
            raise StoreError("the database is closed (the server is shutting down)") from exc

    async def open(self) -> None:
        """Connect and migrate now (at start-up) rather than at the first call."""
        await self.run(lambda tx: None)

    def close(self) -> None:
        """Close the connection once the calls already made have run; later calls fail with StoreError."""
        if self._closed.is_set():
            return

        def close_backend() -> None:
            self._closed.set()
            if self._backend is not None:
                self._backend.close()
                self._backend = None

        try:
            self._executor.submit(close_backend)
        except RuntimeError:  # the interpreter is shutting down
            return
        self._executor.shutdown(wait=True)
