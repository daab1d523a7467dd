"""Helpers of the Ctrl-C tests: the answers on disk, and child processes that take SIGINT as a terminal's Ctrl-C
would reach them, however the test run was started.

A non-interactive shell starts a background job (``make test &``, ``nohup make test > log &``) with SIGINT ignored,
and every process it starts inherits that; amulet-eval keeps an ignored SIGINT ignored, as any program does. So the
children of the Ctrl-C tests set Python's default SIGINT handler first, as an interactive start would have left it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

RESTORE_SIGINT = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"


def python_argv(code: str, *args: str) -> list[str]:
    """``python -c code args``, with SIGINT restored first."""
    return [sys.executable, "-c", RESTORE_SIGINT + code, *args]


def amulet_eval_argv(args: Sequence[str]) -> list[str]:
    """The ``amulet-eval`` console script (amulet_eval.entry, run as its ``__main__``) with ``args``."""
    run = "import runpy\nrunpy.run_module('amulet_eval.entry', run_name='__main__', alter_sys=True)\n"
    return python_argv(run, *args)


def complete_rows(out: Path) -> list[dict]:
    """The whole rows of ``out/generations.jsonl`` (none when it does not exist yet)."""
    path = out / "generations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
