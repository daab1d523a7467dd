"""The server's database: one connection on a thread of its own, every call off the event loop.

:meth:`Database.run` runs a function in one transaction on the database's thread (SQLite and psycopg are
blocking; the calls are serialised, as SQLite's writes are anyway). The connection is opened, and the schema
brought up to date (:func:`~server.store.migrations.migrate`), by the first call (or :meth:`Database.open` at
start-up); a lost connection is replaced at the next call. Any failure is a :class:`StoreError`: its cause
goes to the log, the caller gets a stable message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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
    """See the module docstring. ``connect`` opens a new connection (default: :func:`connect` of ``config``).

    The calls run on one thread of the database's own, started by the first call, fed through a queue. Its end is
    asked for by :meth:`close` (which waits for it) or :meth:`release` (which does not, and takes no lock: what a
    finalizer may call from inside any allocation)."""

    def __init__(self, config: StoreConfig, open_backend: Callable[[], Backend] | None = None) -> None:
        self.config = config
        self.where = describe(config)
        self._open_backend = open_backend or (lambda: connect(config))
        self._backend: Backend | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        """Calls to run, in order; None: close the connection and end the thread."""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        """Orders :meth:`run`'s checks and queueing against the thread's closing (never taken by :meth:`release`)."""
        self._closed = False

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
        """``work(tx)`` in one transaction on the database's thread; StoreError when the database fails or is closed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreError(CLOSED_MESSAGE)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="amulet-store", daemon=True)
                self._thread.start()
            self._jobs.put(_Job(work, loop, future))
        return await future

    async def open(self) -> None:
        """Connect and migrate now (at start-up) rather than at the first call."""
        await self.run(lambda tx: None)

    def close(self) -> None:
        """Close the connection once the calls already made have run, and wait for that; later calls fail with
        StoreError."""
        with self._lock:
            thread = self._thread
            if thread is None:  # never called: nothing to close
                self._closed = True
                return
        self.release()
        thread.join()

    def release(self) -> None:
        """Ask the database's thread to close the connection and end once the calls already made have run; returns
        at once. It takes no lock and waits for nothing, so a finalizer may call it (a finalizer runs inside
        whatever allocation set off the collection, possibly while its thread holds any lock)."""
        self._jobs.put(None)

    def _serve(self) -> None:
        """The database's thread: run the queued calls in order until asked to end, then close the connection and
        fail what was queued after the end was asked for."""
        while (job := self._jobs.get()) is not None:
            job.settle(self._call)
        with self._lock:
            self._closed = True
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception:
                logger.debug("Closing the database connection failed", exc_info=True)
            self._backend = None
        while True:
            try:
                late = self._jobs.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.settle(None)


CLOSED_MESSAGE = "the database is closed (the server is shutting down)"


@dataclass(frozen=True)
class _Job:
    """One call of :meth:`Database.run`: the work, and the future its caller awaits on its event loop."""

    work: Callable[[Transaction], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def settle(self, call: Callable[[Callable[[Transaction], Any]], Any] | None) -> None:
        """Run the work through ``call`` (None: the database is closed) and hand the outcome to the caller's loop
        (nothing when that loop has closed: its caller is gone)."""
        if self.future.done():  # cancelled by its caller before it ran
            return
        try:
            if call is None:
                raise StoreError(CLOSED_MESSAGE)
            result, error = call(self.work), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the caller's loop has closed
            self.loop.call_soon_threadsafe(_set_outcome, self.future, result, error)


def _set_outcome(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
