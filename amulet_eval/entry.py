"""The ``amulet-eval`` console script: says how to install the evaluation extra when it is missing.

The serving install (``pip install amulet-serve``) does not carry the evaluation's libraries; they
come with ``pip install 'amulet-serve[eval]'``. This module imports nothing heavy, so the hint is
printed instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

EXTRA_MODULES = ("tqdm", "matplotlib", "textstat", "vaderSentiment", "choix", "httpx")


def missing_modules() -> list[str]:
    """The evaluation extra's modules that are not installed."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_modules()
    if missing:
        print(
            f"amulet-eval: error: the evaluation extra is not installed (missing: {', '.join(missing)}). "
            "Install it with `pip install 'amulet-serve[eval]'` (or `make install-dev`).",
            file=sys.stderr,
        )
        return 2
    from amulet_eval.cli import main as cli_main
    from amulet_eval.interrupt import INTERRUPTED, exit_now

    code = cli_main(argv)
    if code == INTERRUPTED:
        exit_now(code)  # without the interpreter's teardown, which alone takes seconds (amulet_eval.interrupt)
    return code


if __name__ == "__main__":
    sys.exit(main())
