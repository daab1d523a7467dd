"""``amulet-server``'s options of the database (a part of :func:`server.options.build_parser`):
``--data-dir``, ``--database-url``, ``--response-ttl`` and ``--max-stored-responses``."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

from server.store.config import DEFAULT_MAX_STORED_RESPONSES, SQLITE_FILE, StoreConfig

DATA_DIR_ENV = "AMULET_DATA_DIR"
DATABASE_URL_ENV = "AMULET_DATABASE_URL"
DEFAULT_RESPONSE_TTL = "30d"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_OFF = ("none", "off", "")


def parse_duration(text: str) -> float | None:
    """``3600``, ``90s``, ``15m``, ``12h`` or ``30d`` in seconds (above 0); ``none`` is None (no expiry)."""
    if text.strip().lower() in _OFF:
        return None
    match = _DURATION.match(text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--response-ttl must be a duration above 0 such as 3600, 90s, 15m, 12h or 30d (or none), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def default_data_dir(env: Mapping[str, str]) -> str:
    """``$AMULET_DATA_DIR``, else ``$XDG_DATA_HOME/amulet-serve``, else ``~/.local/share/amulet-serve``."""
    if env.get(DATA_DIR_ENV):
        return env[DATA_DIR_ENV]
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "amulet-serve")


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR|none",
        help=f"folder of the SQLite database ({SQLITE_FILE}, created on first start) that keeps stored responses "
        f"(POST /v1/responses with store); 'none' keeps them in memory until exit (default: ${DATA_DIR_ENV}, else "
        "~/.local/share/amulet-serve)",
    )
    p.add_argument(
        "--database-url",
        default=None,
        metavar="postgresql://...",
        help=f"a PostgreSQL database instead of SQLite, which several servers (Ray replicas) can share; psycopg "
        f"connection URL, its password best in ~/.pgpass or $PGPASSWORD (default: ${DATABASE_URL_ENV}, else SQLite)",
    )
    p.add_argument(
        "--response-ttl",
        default=DEFAULT_RESPONSE_TTL,
        metavar="DURATION",
        help="how long a stored response is kept: seconds, or 90s, 15m, 12h, 30d; 'none' keeps them until the "
        "per-key cap drops them (default: %(default)s)",
    )
    p.add_argument(
        "--max-stored-responses",
        type=int,
        default=DEFAULT_MAX_STORED_RESPONSES,
        metavar="N",
        help="responses kept per API key; storing one more drops the key's oldest (default: %(default)s)",
    )


def store_config(args: argparse.Namespace, env: Mapping[str, str]) -> StoreConfig:
    """The :class:`StoreConfig` of these options (ValueError on a bad value)."""
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir(env)
    return StoreConfig(
        data_dir=None if data_dir.strip().lower() in _OFF else data_dir,
        database_url=args.database_url or env.get(DATABASE_URL_ENV) or None,
        response_ttl_s=parse_duration(args.response_ttl),
        max_responses_per_key=args.max_stored_responses,
    )
