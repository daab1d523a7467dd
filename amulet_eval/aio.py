"""Running coroutines: a bounded worker pool (the first failure or Ctrl-C cancels the rest) and the event loop's entry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

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


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, where ``main`` cancelled from outside ends as KeyboardInterrupt: only a Ctrl-C does that
    (amulet_eval.interrupt cancels the running loop's tasks; asyncio's own handler ends the same way)."""
    try:
        return asyncio.run(main)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
