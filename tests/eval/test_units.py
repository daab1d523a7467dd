"""amulet-eval on hand-made data: proxy metrics, win rates and Bradley-Terry strengths."""

from __future__ import annotations

import math

import pytest

from amulet_core.method.preference_prompts import PRESETS
from amulet_eval import proxies
from amulet_eval.compare import (
    Outcome,
    WinRate,
    bradley_terry,
    bradley_terry_by_preference,
    outcomes_from_scores,
    pooled_win_rates,
    win_probability,
    win_rates,
)

# ---------------------------------------------------------------- proxies


def test_word_count_and_distinct_n() -> None:
    assert proxies.words("Don't panic - it's a well-known e-mail, OK?") == [
        "don't",
        "panic",
        "it's",
        "a",
        "well-known",
        "e-mail",
        "ok",
    ]
    assert proxies.word_count("") == 0
    assert proxies.word_count("1. Water it.\n2. Sun!") == 5
    # bigrams: (a b) (b a) (a b) (b c) -> 3 distinct of 4
    assert proxies.distinct_n("a b a b c", 2) == pytest.approx(3 / 4)
    assert proxies.distinct_n("one", 2) == 0.0
    assert proxies.type_token_ratio("the cat and the hat") == pytest.approx(4 / 5)
    assert proxies.type_token_ratio("...") == 0.0


def test_sentiment_and_readability_order_texts_as_expected() -> None:
    scorer = proxies.ProxyScorer()
    happy = scorer.sentiment("What a wonderful day! I love this, it is great and makes me happy.")
    sad = scorer.sentiment("This is terrible and sad. I hate it; everything is awful.")
    assert -1 <= sad < 0 < happy <= 1
    assert scorer.sentiment("The box is on the table.") == 0.0
    simple = proxies.readability_grade("The cat sat. The dog ran. We had fun.")
    hard = proxies.readability_grade(
        "Notwithstanding considerable methodological heterogeneity, the interdisciplinary investigation "
        "substantiates the hypothesized relationship between socioeconomic stratification and educational attainment."
    )
    assert hard > simple + 10
    assert proxies.readability_grade("") == 0.0
    assert set(scorer.score("Hi there.")) == {"words", "sentiment", "grade", "distinct2", "ttr"}


def test_matched_metrics_cover_the_presets_they_fit() -> None:
    expected = {
        "concise": ("words", False),
        "verbose": ("words", True),
        "uplifting": ("sentiment", True),
        "pleasant": ("sentiment", True),
        "complex": ("grade", True),
        "formal": ("grade", True),
        "creative": ("distinct2", True),
    }
    for preset in PRESETS:
        metric = proxies.matched_metric(preset)
        if preset in expected:
            assert metric is not None and (metric.name, metric.higher_is_better) == expected[preset]
        else:
            assert metric is None  # sycophantic
    assert proxies.matched_metric(" Concise ") is not None
    assert proxies.matched_metric("Answer like a pirate.") is None


# ---------------------------------------------------------------- win rates and Bradley-Terry


def test_outcomes_follow_the_direction_of_the_metric() -> None:
    scores = {(0, "concise", "base"): 50.0, (0, "concise", "amulet"): 20.0, (0, "verbose", "base"): 50.0}
    scores[(0, "verbose", "amulet")] = 20.0
    scores[(1, "concise", "base")] = 30.0
    scores[(1, "concise", "amulet")] = 30.0
    out = outcomes_from_scores(scores, ["base", "amulet"], lambda p: p == "verbose")
    by = {(o.index, o.preference): o.winner for o in out}
    assert by == {(0, "concise"): "amulet", (1, "concise"): None, (0, "verbose"): "base"}


def test_win_rates_count_ties_as_half() -> None:
    outcomes = [
        Outcome(0, "p", "m", "base", "m"),
        Outcome(1, "p", "base", "m", "m"),  # the baseline may be on either side
        Outcome(2, "p", "m", "base", None),
        Outcome(3, "p", "m", "base", "base"),
        Outcome(0, "p", "m", "other", "other"),  # not against base: ignored
        Outcome(0, "q", "m", "base", "base"),
    ]
    rates = win_rates(outcomes, ["base", "m", "other"], "base")
    assert rates["p"]["m"] == WinRate(wins=2, ties=1, losses=1)
    assert rates["p"]["m"].rate == pytest.approx(2.5 / 4)
    assert "other" not in rates["p"]
    assert rates["q"]["m"].rate == 0.0
    pooled = pooled_win_rates(rates, ["base", "m"])
    assert pooled["m"] == WinRate(2, 1, 2) and pooled["m"].rate == pytest.approx(2.5 / 5)


def _mm_bradley_terry(n: int, wins: list[list[float]], iterations: int = 20000) -> list[float]:
    """Independent oracle: Hunter's MM algorithm on a (fractional) win matrix, log-strengths of mean 0."""
    p = [1.0] * n
    for _ in range(iterations):
        new = []
        for i in range(n):
            w = sum(wins[i])
            denom = sum((wins[i][j] + wins[j][i]) / (p[i] + p[j]) for j in range(n) if j != i)
            new.append(w / denom)
        total = sum(new)
        p = [x * n / total for x in new]
    logs = [math.log(x) for x in p]
    mean = sum(logs) / n
    return [x - mean for x in logs]


def test_bradley_terry_two_methods_matches_the_closed_form() -> None:
    # 3 wins to 1: the ML log-odds is ln 3, split evenly around mean 0.
    outcomes = [Outcome(i, "p", "x", "y", "x") for i in range(3)] + [Outcome(3, "p", "x", "y", "y")]
    s = bradley_terry(outcomes, ["x", "y"], alpha=1e-9)
    assert s["x"] - s["y"] == pytest.approx(math.log(3), abs=1e-4)
    assert s["x"] + s["y"] == pytest.approx(0, abs=1e-9)
    assert win_probability(s, "x", "y") == pytest.approx(0.75, abs=1e-4)


def test_bradley_terry_with_ties_matches_an_mm_oracle() -> None:
    methods = ["a", "b", "c"]
    record = {("a", "b"): (3, 1, 1), ("a", "c"): (4, 0, 2), ("b", "c"): (2, 2, 1)}  # (wins of first, ties, losses)
    outcomes: list[Outcome] = []
    wins = [[0.0] * 3 for _ in range(3)]
    for (x, y), (w, t, lo) in record.items():
        i, j = methods.index(x), methods.index(y)
        outcomes += [Outcome(0, "p", x, y, x)] * w + [Outcome(0, "p", x, y, None)] * t + [Outcome(0, "p", x, y, y)] * lo
        wins[i][j] += w + t / 2
        wins[j][i] += lo + t / 2
    got = bradley_terry(outcomes, methods, alpha=1e-9)
    want = _mm_bradley_terry(3, wins)
    for m, w in zip(methods, want, strict=True):
        assert got[m] == pytest.approx(w, abs=1e-3)
    assert got["a"] > got["b"] > got["c"]


def test_bradley_terry_all_ties_and_unbeaten() -> None:
    ties = [Outcome(i, "p", "x", "y", None) for i in range(4)]
    assert bradley_terry(ties, ["x", "y"]) == pytest.approx({"x": 0.0, "y": 0.0}, abs=1e-9)
    unbeaten = [Outcome(i, "p", "x", "y", "x") for i in range(4)]
    s = bradley_terry(unbeaten, ["x", "y"], alpha=0.01)
    assert math.isfinite(s["x"]) and s["x"] > s["y"]
    assert bradley_terry([], ["x", "y"]) == {}


def test_bradley_terry_by_preference_pools_under_all() -> None:
    outcomes = [Outcome(0, "p", "x", "y", "x"), Outcome(0, "q", "x", "y", "y"), Outcome(1, "q", "x", "y", "y")]
    bt = bradley_terry_by_preference(outcomes, ["x", "y"])
    assert set(bt) == {"p", "q", "all"}
    assert bt["p"]["x"] > 0 > bt["q"]["x"]
    assert bt["all"]["y"] > bt["all"]["x"]
