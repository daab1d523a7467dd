"""The degeneration rules on answers the embedded model really wrote (the issue's and the sweep's)."""

from __future__ import annotations

import math

import pytest

from amulet_eval.quality import degeneration_reasons, pooled_quality

FLUENT = (
    "To keep basil from dying, use a good soil with plenty of organic matter, avoid overwatering, and keep it in a sunny spot."
)


@pytest.mark.parametrize(
    ("text", "fluency", "reason"),
    [
        ("Use     use basil", -2.0, "fewer than 5 words"),
        (":.:.My Answerlessquisure", -7.0, "fluency below -4"),
        ('reply)"){};,,,,,,,,,,,,,,,ocles', -9.0, "a run of 4+ punctuation"),
        ("the intersection of " * 12, -0.3, "a word 4-gram repeated"),
        ("Boil an egg:\n\nBoil an egg:\n\nBoil an egg:\n\nBoil an egg: now", -0.5, "a word 4-gram repeated"),
        (FLUENT, math.nan, "fluency below -4"),
    ],
)
def test_degenerate_answers_are_caught(text: str, fluency: float, reason: str) -> None:
    assert any(r.startswith(reason) for r in degeneration_reasons(text, fluency)), degeneration_reasons(text, fluency)


@pytest.mark.parametrize(
    "text",
    [
        FLUENT,
        "| step | what |\n|---|---|\n| 1 | Water the basil every morning. |",  # a markdown table rule is not a punctuation run
        "1. Water it well. 2. Give it sun. 3. Pinch the flowers off early.",
    ],
)
def test_fluent_answers_pass(text: str) -> None:
    assert degeneration_reasons(text, -0.8) == []
    assert degeneration_reasons(text) == []  # without a fluency score only the text rules apply


def test_pooled_quality_per_method() -> None:
    fluency = {(0, "concise", "base"): -0.5, (1, "concise", "base"): -1.5, (0, "concise", "amulet"): math.nan}
    degenerate = {(0, "concise", "base"): 0.0, (1, "concise", "base"): 1.0, (0, "concise", "amulet"): 1.0}
    pooled = pooled_quality(fluency, degenerate, ["base", "amulet", "la"])
    assert pooled["base"] == {"n": 2, "fluency": -1.0, "degenerate": 0.5, "degenerate_count": 1}
    assert pooled["amulet"]["fluency"] is None and pooled["amulet"]["degenerate_count"] == 1
    assert "la" not in pooled
