"""README never shows what the product does not do: each example answer it prints is what the server
returns for that request today (greedy, the embedded model in float32; see tests/tools/readme_examples.py)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tools.readme_examples import README, answer, embedded_server, examples


def test_readme_shows_answers_for_the_preference_examples() -> None:
    found = examples(README.read_text(encoding="utf-8"))
    assert len(found) >= 2
    assert all(ex.shown.strip() for ex in found)
    assert any(ex.body.get("preference") == "concise" for ex in found)


@pytest.mark.smollm
def test_the_server_returns_exactly_the_answers_readme_shows() -> None:
    found = examples(README.read_text(encoding="utf-8"))
    with embedded_server() as url, ThreadPoolExecutor(len(found)) as pool:
        # All at once: the engine batches them, each answer the same bits as alone (the CPU engine is batch-invariant).
        answers = list(pool.map(functools.partial(answer, url), found))
        for example, got in zip(found, answers, strict=True):
            assert got == example.shown, (
                f"README's answer is stale for {example.body}; run python -m tests.tools.readme_examples --write"
            )
