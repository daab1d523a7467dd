"""Comparisons: pairwise outcomes, win rates against base (ties count half) and Bradley-Terry strengths.

Bradley-Terry strengths come from ``choix.ilsr_pairwise`` (the library the paper used). choix takes
only (winner, loser) pairs, so every decisive comparison enters twice and a tie once each way: the
log-likelihood is then exactly twice that of counting a tie as half a win for each side, so the
estimate is the same. A small L2 regularization (``alpha``) keeps it finite when a method wins or
loses every comparison. Strengths are log-strengths, shifted so that their mean is 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import choix
import numpy as np

Key = tuple[int, str, str]
ALL = "all"
"""The pooled entry of Bradley-Terry results (every preference together)."""


@dataclass(frozen=True)
class Outcome:
    """One pairwise comparison of two methods' answers to one question under one preference."""

    index: int
    preference: str
    a: str
    b: str
    winner: str | None
    """a, b, or None for a tie."""


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n, "win_rate": self.rate}


def same(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def outcomes_from_scores(
    scores: Mapping[Key, float], methods: Sequence[str], higher_is_better: Callable[[str], bool]
) -> list[Outcome]:
    """Every pair of methods on every (question, preference) both answered: the better score wins, equal ties."""
    cells = sorted({(k[0], k[1]) for k in scores}, key=lambda c: (c[1], c[0]))
    out: list[Outcome] = []
    for index, pref in cells:
        higher = higher_is_better(pref)
        for a, b in combinations(methods, 2):
            sa, sb = scores.get((index, pref, a)), scores.get((index, pref, b))
            if sa is None or sb is None:
                continue
            winner = None if same(sa, sb) else a if (sa > sb) == higher else b
            out.append(Outcome(index, pref, a, b, winner))
    return out


def win_rates(outcomes: Iterable[Outcome], methods: Sequence[str], baseline: str) -> dict[str, dict[str, WinRate]]:
    """Per preference, each method's record against ``baseline`` (from the outcomes that pair the two)."""
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for o in outcomes:
        if baseline not in (o.a, o.b) or o.a == o.b:
            continue
        method = o.b if o.a == baseline else o.a
        slot = 1 if o.winner is None else 0 if o.winner == method else 2
        tally[o.preference][method][slot] += 1
    return {pref: {m: WinRate(*by_method[m]) for m in methods if m in by_method} for pref, by_method in tally.items()}


def pooled_win_rates(per_preference: Mapping[str, Mapping[str, WinRate]], methods: Sequence[str]) -> dict[str, WinRate]:
    """Each method's record against base over all preferences together."""
    out: dict[str, WinRate] = {}
    for m in methods:
        parts = [wr[m] for wr in per_preference.values() if m in wr]
        if parts:
            out[m] = WinRate(sum(p.wins for p in parts), sum(p.ties for p in parts), sum(p.losses for p in parts))
    return out


def bradley_terry(outcomes: Iterable[Outcome], methods: Sequence[str], alpha: float = 0.01) -> dict[str, float]:
    """Log-strengths (mean 0) of the methods that appear in the outcomes; ties count half a win each."""
    outcomes = list(outcomes)
    present = [m for m in methods if any(m in (o.a, o.b) for o in outcomes)]
    if len(present) < 2:
        return {}
    index = {m: i for i, m in enumerate(present)}
    data: list[tuple[int, int]] = []
    for o in outcomes:
        a, b = index[o.a], index[o.b]
        if o.winner is None:
            data += [(a, b), (b, a)]
        elif o.winner == o.a:
            data += [(a, b), (a, b)]
        else:
            data += [(b, a), (b, a)]
    params = np.asarray(choix.ilsr_pairwise(len(present), data, alpha=alpha), dtype=float)
    params = params - params.mean()
    return {m: float(params[index[m]]) for m in present}


def bradley_terry_by_preference(
    outcomes: Sequence[Outcome], methods: Sequence[str], alpha: float = 0.01
) -> dict[str, dict[str, float]]:
    """Strengths for each preference, and pooled over all of them under ``"all"``."""
    prefs = list(dict.fromkeys(o.preference for o in outcomes))
    out = {p: bradley_terry([o for o in outcomes if o.preference == p], methods, alpha) for p in prefs}
    if len(prefs) > 1:
        out[ALL] = bradley_terry(outcomes, methods, alpha)
    return {p: s for p, s in out.items() if s}


def win_probability(strengths: Mapping[str, float], method: str, baseline: str) -> float:
    """P(method beats baseline) under the Bradley-Terry model."""
    return 1.0 / (1.0 + math.exp(strengths[baseline] - strengths[method]))


def means(scores: Mapping[Key, float]) -> dict[str, dict[str, tuple[float, int]]]:
    """(mean, count) of the scores per preference and method."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, pref, method), value in scores.items():
        groups[pref][method].append(value)
    return {p: {m: (sum(v) / len(v), len(v)) for m, v in by.items()} for p, by in groups.items()}
