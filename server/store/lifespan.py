"""The database's part of an app's lifespan: opened (created and migrated) at start-up, closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.store.database import Database, StoreError

logger = logging.getLogger(__name__)


def store_lifespan(inner: Callable[[FastAPI], Any] | None, database: Database) -> Callable[[FastAPI], Any]:
    """``inner`` (the engine's lifespan, or none) inside the database's: the database opens first (a failure is
    logged and the server starts anyway: the routes that need it answer 503 until it can be opened) and closes
    last, once the running requests have drained and stored their responses."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        try:
            await database.open()
        except StoreError:
            logger.error("The database in %s could not be opened; stored responses answer 503 until it can.", database.where)
        try:
            if inner is None:
                yield None
            else:
                async with inner(app) as state:
                    yield state
        finally:
            await asyncio.to_thread(database.close)

    return lifespan
