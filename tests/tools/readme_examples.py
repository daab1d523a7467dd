"""README's example answers, produced by the embedded model: ``python -m tests.tools.readme_examples [--write]``.

In README.md a ``curl`` example whose answer is shown is followed by the marker line
``<!-- answer -->`` and a fenced ``text`` block holding the answer's content. This script starts the
real server (``amulet-server --dtype float32 --cpu-threads 1``: float32 and one thread, so the greedy
answer does not depend on whether the CPU has native bfloat16), sends each example's request body,
and prints the answers; ``--write`` puts them into README.md. ``tests/server/test_readme_answers.py``
checks that the server still returns exactly the text README shows. Every example with an answer must
be greedy (``"temperature": 0``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from server.assembly import build_app
from server.options import parse_args
from tests.support import ROOT
from tests.support.live_server import live_server, wait_ready

README = ROOT / "README.md"
SERVER_ARGS = ("--dtype", "float32", "--cpu-threads", "1")
_EXAMPLE = re.compile(r"```bash\n(curl[^\n]*\n.*?)```\n\n<!-- answer -->\n```text\n(.*?)\n```", re.DOTALL)
_BODY = re.compile(r"-d '(.*?)'", re.DOTALL)
_PATH = re.compile(r"http://localhost:8000(/\S+)")


@dataclass(frozen=True)
class Example:
    path: str
    body: dict[str, Any]
    shown: str
    """The answer README shows now."""
    span: tuple[int, int]
    """Where the shown answer sits in README's text."""


def examples(markdown: str) -> list[Example]:
    """Every curl example of the markdown that shows its answer."""
    found = []
    for match in _EXAMPLE.finditer(markdown):
        curl = match.group(1)
        body, path = _BODY.search(curl), _PATH.search(curl)
        if body is None or path is None:
            raise ValueError(f"an example with an answer has no -d body or URL:\n{curl}")
        request = json.loads(body.group(1))
        if request.get("temperature") != 0 or request.get("stream"):
            raise ValueError(f"an example with an answer must be greedy and not streamed:\n{curl}")
        found.append(Example(path.group(1), request, match.group(2), match.span(2)))
    return found


@contextmanager
def embedded_server() -> Iterator[str]:
    """The real server on the embedded model, on a free loopback port; yields its base URL."""
    app = build_app(parse_args(list(SERVER_ARGS)))
    with live_server(app) as server:
        wait_ready(server.url)
        yield server.url


def answer(url: str, example: Example) -> str:
    response = httpx.post(url + example.path, json=example.body, timeout=600)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the answers into README.md")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    found = examples(text)
    with embedded_server() as url:
        answers = [answer(url, ex) for ex in found]
    for ex, got in zip(found, answers, strict=True):
        print(f"--- {json.dumps(ex.body)}\n{got}\n")
    if args.write:
        for ex, got in sorted(zip(found, answers, strict=True), key=lambda pair: -pair[0].span[0]):
            text = text[: ex.span[0]] + got + text[ex.span[1] :]
        README.write_text(text, encoding="utf-8")
        print(f"wrote {len(found)} answers into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
