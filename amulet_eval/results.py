"""Every number of an evaluation, as one JSON-ready dict: means, win rates against base, Bradley-Terry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from amulet_eval.compare import (
    ALL,
    Outcome,
    bradley_terry_by_preference,
    means,
    outcomes_from_scores,
    pooled_win_rates,
    win_probability,
    win_rates,
)
from amulet_eval.scoring import ScoreSet
from amulet_eval.store import Row


def _ordered(data: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    return {k: data[k] for k in [*order, *[k for k in data if k not in order]] if k in data}


def comparison_results(
    outcomes: Sequence[Outcome], preferences: Sequence[str], methods: Sequence[str], baseline: str, alpha: float
) -> dict[str, Any]:
    """Win rates against ``baseline`` (per preference and pooled) and Bradley-Terry strengths."""
    per_pref = win_rates(outcomes, methods, baseline)
    wr: dict[str, Any] = {p: {m: r.as_dict() for m, r in by.items()} for p, by in _ordered(per_pref, preferences).items()}
    if len(per_pref) > 1:
        wr[ALL] = {m: r.as_dict() for m, r in pooled_win_rates(per_pref, methods).items()}
    bt = _ordered(bradley_terry_by_preference(outcomes, methods, alpha), [*preferences, ALL])
    p_beats = {p: {m: win_probability(s, m, baseline) for m in s if m != baseline} for p, s in bt.items() if baseline in s}
    return {
        "win_rate_vs_base": wr,
        "bradley_terry": bt,
        "bradley_terry_p_beats_base": p_beats,
        "comparisons": len(outcomes),
    }


def score_results(
    scores: ScoreSet, preferences: Sequence[str], methods: Sequence[str], baseline: str, alpha: float, compare: bool = True
) -> dict[str, Any]:
    """Means per preference and method and, when ``compare``, the comparisons the scores imply."""
    m = _ordered(means(scores.values), preferences)
    out: dict[str, Any] = {
        "label": scores.label,
        "is_proxy": scores.is_proxy,
        "metrics": {
            p: {"name": x.name, "description": x.description, "higher_is_better": x.higher_is_better}
            for p, x in _ordered(scores.metrics, preferences).items()
        },
        "mean": {p: {k: by[k][0] for k in methods if k in by} for p, by in m.items()},
        "n": {p: {k: by[k][1] for k in methods if k in by} for p, by in m.items()},
    }
    if compare:
        outcomes = outcomes_from_scores(scores.values, methods, scores.higher_is_better)
        out.update(comparison_results(outcomes, preferences, methods, baseline, alpha))
    return out


def judge_outcomes(judgments: Sequence[Row]) -> list[Outcome]:
    return [Outcome(j["index"], j["preference"], j["method_a"], j["method_b"], j["winner"]) for j in judgments]


def judge_results(
    judgments: Sequence[Row], preferences: Sequence[str], methods: Sequence[str], baseline: str, alpha: float, label: str
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "label": label,
        "is_proxy": False,
        "judgments": len(judgments),
        "unparseable": sum(1 for j in judgments if not j["parsed"]),
        "ties": sum(1 for j in judgments if j["winner"] is None),
    }
    out.update(comparison_results(judge_outcomes(judgments), preferences, methods, baseline, alpha))
    return out
