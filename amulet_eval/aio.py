"""A bounded worker pool for coroutines: the first failure (or Ctrl-C) cancels the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def run_pool(items: Sequence[T], width: int, work: Callable[[T], Awaitable[None]]) -> None:
    """Await ``work(item)`` for every item, at most ``width`` at a time, in order of starting."""
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(width, len(items))))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
