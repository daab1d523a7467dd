"""PNG charts of the results, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def score_grid(
    path: Path,
    title: str,
    values: Mapping[str, Mapping[str, float]],
    ylabels: Mapping[str, str],
    methods: Sequence[str],
) -> Path:
    """One small bar chart per preference (its own metric and scale), one bar per method."""
    prefs = list(values)
    cols = min(4, max(1, len(prefs)))
    rows = math.ceil(len(prefs) / cols) if prefs else 1
    fig = Figure(figsize=(3.4 * cols, 2.9 * rows + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(prefs):
            ax.set_visible(False)
            continue
        pref = prefs[i]
        shown = [m for m in methods if m in values[pref]]
        heights = [values[pref][m] for m in shown]
        ax.bar(range(len(shown)), heights, color=[_COLORS[methods.index(m) % len(_COLORS)] for m in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=30, fontsize=8)
        ax.set_title(pref if len(pref) <= 30 else pref[:27] + "...", fontsize=10)
        ax.set_ylabel(ylabels.get(pref, ""), fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    return _save(fig, path)


def win_rate_chart(path: Path, title: str, rates: Mapping[str, Mapping[str, float]], methods: Sequence[str]) -> Path:
    """Grouped bars: for each preference, each method's win rate against base; the line marks 0.5 (a draw)."""
    prefs = list(rates)
    shown = [m for m in methods if any(m in rates[p] for p in prefs)]
    width = 0.8 / max(1, len(shown))
    fig = Figure(figsize=(max(5.0, 1.1 * len(prefs) + 2.5), 3.8), layout="constrained")
    ax = fig.subplots()
    for j, method in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(prefs))]
        ys = [rates[p].get(method, math.nan) for p in prefs]
        ax.bar(xs, ys, width, label=method, color=_COLORS[methods.index(method) % len(_COLORS)])
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(prefs)), [p if len(p) <= 16 else p[:13] + "..." for p in prefs], rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs base (ties = 1/2)")
    ax.set_title(title)
    if shown:
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)
