"""Append-only JSONL files that survive Ctrl-C: one row a line, flushed and synced as it is written.

A run killed mid-write leaves at most one partial last line; reading skips unparseable lines, and
the next append starts on a fresh line, so nothing already written is lost or corrupted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

Row = dict[str, Any]


def read_rows(path: Path) -> tuple[list[Row], int]:
    """Every JSON-object line of ``path`` (none when it does not exist) and how many lines were skipped."""
    if not path.exists():
        return [], 0
    rows: list[Row] = []
    skipped = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


class RowWriter:
    """Appends rows to an open JSONL file; each row is on disk before ``write`` returns."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    def write(self, row: Row) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())


@contextmanager
def append_rows(path: Path) -> Iterator[RowWriter]:
    """Open ``path`` for appending (created with its folder when missing), on a fresh line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as handle:
        if needs_newline:
            handle.write("\n")
        yield RowWriter(handle)
