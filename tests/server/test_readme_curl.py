"""Every ``curl`` example of README.md's "## Using the API" section runs against a real server.

The examples address ``http://localhost:8000``; the test points them at a server on a free port
(over the fake engine) and runs each bash block with the real ``curl``. Set ``AMULET_README`` to
check another file. Every curl in README.md and docker/README.md that sends a body declares it JSON
(``-H 'Content-Type: application/json'``: the server answers 415 otherwise, and curl ``-d`` sends a form).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.fake_engine import FakeEngine
from tests.support.live_server import LiveServer

SECTION = "## Using the API"


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=8192)  # the fake's tokens are characters; the tool example's prompt is long


EXAMPLE_URL = "http://localhost:8000"


def readme() -> Path:
    return Path(os.environ.get("AMULET_README", ROOT / "README.md"))


def curl_blocks(markdown: str) -> list[str]:
    """The ```bash blocks starting with curl inside the section (up to the next level-2 heading)."""
    start = markdown.find(f"{SECTION}\n")
    if start < 0:
        return []
    rest = markdown[start + len(SECTION) :]
    end = re.search(r"^## ", rest, re.MULTILINE)
    section = rest[: end.start()] if end else rest
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return [b for b in blocks if b.lstrip().startswith("curl")]


def json_documents(text: str) -> list[Any]:
    """One or more JSON values written back to back (``curl a && curl b``)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def check_output(out: str) -> None:
    if out.startswith("data: "):
        events = [block.removeprefix("data: ") for block in out.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all("error" not in c for c in chunks)
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
        return
    docs = json_documents(out)
    assert docs
    for doc in docs:
        assert isinstance(doc, dict) and "error" not in doc, doc
        if doc.get("object") == "chat.completion":
            assert doc["choices"][0]["message"]["content"]


def test_readme_has_the_api_section_with_curl_examples() -> None:
    path = readme()
    assert path.is_file(), f"{path} is missing"
    text = path.read_text(encoding="utf-8")
    assert SECTION in text, f"{path} has no '{SECTION}' section (merge server/README_API.md into it)"
    assert len(curl_blocks(text)) >= 3


def test_readme_curl_examples_run(server: LiveServer) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    blocks = curl_blocks(readme().read_text(encoding="utf-8")) if readme().is_file() else []
    assert blocks, f"no curl examples in the '{SECTION}' section of {readme()}"
    for block in blocks:
        assert EXAMPLE_URL in block, block
        script = block.replace(EXAMPLE_URL, server.url)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{block}\nexit {done.returncode}: {done.stderr}"
        try:
            check_output(done.stdout)
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"unexpected output of\n{block}\n---\n{done.stdout}") from exc


JSON_HEADER = re.compile(r"""-H\s+(['"])Content-Type:\s*application/json\1""", re.IGNORECASE)
BODY_OPTION = re.compile(r"\s(-d|--data(-raw|-binary)?|--json)\s")


def curl_commands(markdown: str) -> list[str]:
    """Every curl command of the document's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n", " ", block)
        for part in re.split(r"&&|\n", joined):
            if part.strip().startswith("curl"):
                commands.append(part.strip())
    return commands


@pytest.mark.parametrize(
    "document", [ROOT / "README.md", ROOT / "docker" / "README.md"], ids=lambda p: p.parent.name + "/" + p.name
)
def test_every_curl_sending_a_body_declares_json(document: Path) -> None:
    commands = curl_commands(document.read_text(encoding="utf-8"))
    with_body = [c for c in commands if BODY_OPTION.search(c + " ")]
    assert with_body, f"no curl with a body in {document}"
    for command in with_body:
        assert "--json" in command or JSON_HEADER.search(command), f"no -H 'Content-Type: application/json' in: {command}"
