"""README never shows what the product does not do: each example answer it prints is what the server
returns for that request today (greedy, the embedded model in float32; see tests/tools/readme_examples.py)."""

from __future__ import annotations

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
    with embedded_server() as url:
        for example in found:
            assert answer(url, example) == example.shown, (
                f"README's answer is stale for {example.body}; run python -m tests.tools.readme_examples --write"
            )
