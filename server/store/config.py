"""Where the server's database is and how long it keeps what it stores."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_RESPONSE_TTL_S = 30 * 24 * 3600.0
"""Stored responses are kept 30 days by default (as OpenAI keeps them)."""
DEFAULT_MAX_STORED_RESPONSES = 10_000
"""Responses kept per API key by default; storing one more drops the oldest."""
SQLITE_FILE = "amulet-serve.sqlite3"
"""The SQLite database's file name under ``data_dir``."""


@dataclass(frozen=True)
class StoreConfig:
    """``data_dir``: the folder of the SQLite database (created on first start); None keeps everything in memory,
    gone at exit (what an app built without options gets: tests, embedding). ``database_url``
    (``postgresql://...``): a PostgreSQL database instead, which several servers (Ray replicas) can share.
    ``response_ttl_s``: a stored response older than this is gone (None: kept until the per-key cap drops it).
    ``max_responses_per_key``: responses kept per API key; storing one more drops that key's oldest.
    ``clock``: the wall clock (seconds since the epoch) responses are dated and expired by (tests inject one)."""

    data_dir: str | None = None
    database_url: str | None = field(default=None, repr=False)
    response_ttl_s: float | None = DEFAULT_RESPONSE_TTL_S
    max_responses_per_key: int = DEFAULT_MAX_STORED_RESPONSES
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.response_ttl_s is not None and not (math.isfinite(self.response_ttl_s) and self.response_ttl_s > 0):
            raise ValueError(f"response_ttl_s must be above 0 (or None: no expiry), got {self.response_ttl_s}")
        if self.max_responses_per_key < 1:
            raise ValueError(f"max_responses_per_key must be at least 1, got {self.max_responses_per_key}")
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a PostgreSQL URL (postgresql://user@host:port/dbname)")

    @property
    def backend(self) -> str:
        """``postgresql``, ``sqlite`` (a file under ``data_dir``) or ``memory``."""
        if self.database_url is not None:
            return "postgresql"
        return "sqlite" if self.data_dir is not None else "memory"
