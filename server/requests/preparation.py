"""A bounded executor of its own for request preparation (chat templates, tokenizers), off the event loop.

Rendering and tokenizing a long conversation takes a while; on the event loop it would hold up every other
request and ``/health``, and on asyncio's shared default executor it would queue without bound. The pool
runs at most ``preparation_threads`` jobs at once and lets at most ``preparation_queue`` more wait; a job
beyond that is refused at once with a 429 and Retry-After, before any of its work is done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from server.errors import APIError
from server.requests.limits import RequestLimits

T = TypeVar("T")

BUSY_CODE = "server_busy"


class PreparationPool:
    """``await pool.run(fn)`` runs ``fn`` on one of the pool's threads; APIError 429 when the pool is full.

    A slot is held from submission until the job has finished on its thread (not merely until its caller
    stopped waiting): a caller that leaves cannot free room while its job still runs."""

    def __init__(self, limits: RequestLimits, retry_after_s: int = 1) -> None:
        self.limits = limits
        self.retry_after_s = retry_after_s
        self.capacity = limits.preparation_threads + limits.preparation_queue
        self._slots = threading.BoundedSemaphore(self.capacity)
        self._executor = ThreadPoolExecutor(limits.preparation_threads, thread_name_prefix="amulet-prepare")

    def _busy(self) -> APIError:
        return APIError(
            429,
            f"The server is preparing {self.capacity} requests already; retry shortly.",
            type="rate_limit_error",
            code=BUSY_CODE,
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Start ``fn`` on the pool (a concurrent Future), or raise the 429 APIError when it is full."""
        if not self._slots.acquire(blocking=False):
            raise self._busy()
        try:
            future = self._executor.submit(fn)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the pool, awaited; cancelling the caller cancels a job that has not started yet."""
        return await asyncio.wrap_future(self.submit(fn))

    def close(self) -> None:
        """Let running jobs finish and refuse new ones (the threads end)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
