"""API keys: from ``--api-key`` / ``--api-key-file``, else ``$AMULET_API_KEY`` / ``$AMULET_API_KEY_FILE``.

A key file holds one key a line (blank lines and ``#`` comments skipped); several keys let a key be rotated
without downtime. Errors name the file, never a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

API_KEY_ENV = "AMULET_API_KEY"
API_KEY_FILE_ENV = "AMULET_API_KEY_FILE"


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """The keys of an API key file: one per line, surrounding blanks stripped; blank lines and lines
    starting with ``#`` are skipped. Several keys let a key be rotated without downtime.

    Raises ValueError (without any key text) when the file cannot be read or holds no key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file {str(path)!r}: {type(exc).__name__}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError(f"the API key file {str(path)!r} holds no key (one key a line; '#' starts a comment)")
    return keys


def resolve_api_keys(cli_key: str | None, cli_file: str | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """Every accepted key: from ``--api-key`` and ``--api-key-file`` when either is given, else from
    ``$AMULET_API_KEY`` and ``$AMULET_API_KEY_FILE``; none (an open API) when nothing is set.

    Raises ValueError for an unreadable or empty key file, or an empty ``--api-key``."""
    if cli_key is not None or cli_file is not None:
        key, file = cli_key, cli_file
    else:
        key, file = env.get(API_KEY_ENV) or None, env.get(API_KEY_FILE_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("--api-key must not be empty (leave it unset to disable authentication)")
    keys: tuple[str, ...] = (key.strip(),) if key is not None else ()
    if file is not None:
        keys += read_api_keys(file)
    return tuple(dict.fromkeys(keys))
