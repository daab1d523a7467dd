"""The report: ``results.json`` (every number), ``report.md`` (tables) and ``charts/*.png``."""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from amulet_eval import charts
from amulet_eval.compare import ALL

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
CHARTS_DIR = "charts"

PROXY_NOTE = (
    "**These are proxies, not quality judgements.** Each preference with a proxy is scored by one surface "
    "feature: concise/verbose by length in words (lower/higher is better), uplifting/pleasant by VADER "
    "sentiment (compound, -1..1), complex/formal by the Flesch-Kincaid grade level (textstat), creative by "
    "distinct-2 (share of distinct word bigrams). They say nothing about helpfulness or correctness; "
    "sycophantic and free-text preferences have no proxy. A joined condition (`concise+formal`) gets one row per "
    "member with a proxy (`concise+formal [concise]`: words, `concise+formal [formal]`: grade), and the pooled "
    "`all` counts each of those rows."
)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def digits_for(metric_name: str) -> int:
    return 1 if metric_name == "words" else 2


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_table(section: Mapping[str, Any], methods: Sequence[str], directed: bool = True) -> str:
    rows = []
    for pref, by in section["mean"].items():
        metric = section["metrics"][pref]
        better = ("higher" if metric["higher_is_better"] else "lower") if directed else "-"
        rows.append([pref, metric["description"], better, *[fmt(by.get(m), digits_for(metric["name"])) for m in methods]])
    return md_table(["preference", "metric", "better", *methods], rows)


def win_rate_table(section: Mapping[str, Any], methods: Sequence[str]) -> str:
    rows = []
    for pref, by in section["win_rate_vs_base"].items():
        ns = {v["n"] for v in by.values()}
        n = str(ns.pop()) if len(ns) == 1 else "varies"
        rows.append([pref, n, *[fmt(by[m]["win_rate"]) if m in by else "-" for m in methods]])
    return md_table(["preference", "n", *methods], rows)


def bradley_terry_table(section: Mapping[str, Any], methods: Sequence[str]) -> str:
    rows = [[pref, *[fmt(by.get(m)) for m in methods]] for pref, by in section["bradley_terry"].items()]
    return md_table(["preference", *methods], rows)


def _comparison_md(title: str, section: Mapping[str, Any], methods: Sequence[str], baseline: str) -> list[str]:
    others = [m for m in methods if m != baseline]
    out = []
    if section["win_rate_vs_base"]:
        out += [
            f"### {title}: win rate against {baseline}",
            f"Share of questions on which the method beats {baseline} (ties count half; `{ALL}` pools the preferences).",
            "",
            win_rate_table(section, others),
            "",
        ]
    if section["bradley_terry"]:
        out += [
            f"### {title}: Bradley-Terry log-strengths",
            "From every pairwise comparison (choix, ties count half), shifted to mean 0; higher is stronger.",
            "",
            bradley_terry_table(section, methods),
            "",
        ]
    return out


QUALITY_NOTE = (
    "Fluency: mean log-probability per token of each answer under the plain model, given the conversation "
    "without the preference (higher reads more like the model's own language). Degenerate: fluency below -4, "
    "fewer than 5 words, a word 4-gram repeated 3+ times, over 40% of word 3-grams repeated, or a run of 4+ "
    "punctuation characters (amulet_eval/quality.py)."
)


def quality_md(results: Mapping[str, Any], methods: Sequence[str], baseline: str) -> list[str]:
    """The fluency and degeneration tables: pooled per method, then per preference."""
    quality = results.get("quality") or {}
    by_method = quality.get("by_method") or {}
    if not by_method:
        return []
    scorers = results["scorers"]
    base_fluency = (by_method.get(baseline) or {}).get("fluency")
    rows = []
    for m in methods:
        q = by_method.get(m)
        if q is None:
            continue
        gap = q["fluency"] - base_fluency if q["fluency"] is not None and base_fluency is not None else None
        rows.append([m, str(q["n"]), fmt(q["fluency"]), fmt(gap), f"{q['degenerate_count']}/{q['n']}", fmt(q["degenerate"])])
    source = quality.get("fluency_model")
    out = ["## Fluency and degeneration", QUALITY_NOTE, ""]
    out += [
        f"Fluency model: `{source}`."
        if source
        else "Fluency was not measured (no --fluency-model); degeneration uses the text rules only.",
        "",
    ]
    out += [md_table(["method", "answers", "fluency", f"fluency - {baseline}", "degenerate", "share"], rows), ""]
    for name in ("fluency", "degenerate"):
        if name in scorers:
            out += [f"### {scorers[name]['label']}, per preference", "", mean_table(scorers[name], methods), ""]
    return out


def render_markdown(results: Mapping[str, Any], chart_files: Sequence[str]) -> str:
    run = results["run"]
    methods: list[str] = run["methods"]
    baseline: str = run["baseline"]
    out = [
        "# Amulet Serve evaluation",
        "",
        f"- Model: `{run['model']}` ({run['backend']})",
        f"- Questions: {run['questions']} from {run['question_source']}",
        f"- Preferences: {', '.join(run['preferences'])}",
        f"- Methods: {', '.join(methods)}",
        f"- Decoding: {run['decoding']}",
        f"- Command: `{run['command']}`",
        *[f"- {note}" for note in run.get("notes", [])],
        "",
    ]
    scorers: Mapping[str, Any] = results["scorers"]
    if "words" in scorers:
        out += ["## Answer length", "Mean answer length in words (a description, under every preference).", ""]
        out += [mean_table(scorers["words"], methods, directed=False), ""]
    if results.get("ended_before_limit"):
        out += ["### Answers that ended before the token limit", "Share per cell (the rest were cut at the limit).", ""]
        rows = [[p, *[fmt(by.get(m)) for m in methods]] for p, by in results["ended_before_limit"].items()]
        out += [md_table(["preference", *methods], rows), ""]
    out += quality_md(results, methods, baseline)
    if "proxy" in scorers:
        out += ["## Proxy metrics (proxies)", PROXY_NOTE, "", "Mean of the proxy matched to each preference.", ""]
        out += [mean_table(scorers["proxy"], methods), ""]
        out += _comparison_md("Proxy", scorers["proxy"], methods, baseline)
    if "reward" in scorers:
        out += [f"## {scorers['reward']['label']}", "Mean reward-model score (higher is better).", ""]
        out += [mean_table(scorers["reward"], methods), ""]
        out += _comparison_md("Reward model", scorers["reward"], methods, baseline)
    if "judge" in scorers:
        judge = scorers["judge"]
        out += [
            f"## {judge['label']}",
            f"{judge['judgments']} pairwise judgments, {judge['ties']} ties, of which {judge['unparseable']} were "
            "unparseable replies (counted as ties).",
            "",
        ]
        out += _comparison_md("Judge", judge, methods, baseline)
    if chart_files:
        out += ["## Charts", ""] + [f"![{Path(f).stem}]({f})" for f in chart_files] + [""]
    return "\n".join(out)


def draw_charts(results: Mapping[str, Any], out_dir: Path) -> list[str]:
    """The PNG charts; returns their paths relative to ``out_dir``."""
    methods = results["run"]["methods"]
    made: list[Path] = []
    for name, section in results["scorers"].items():
        if section.get("mean"):
            labels = {
                p: f"{m['name']} ({'higher' if m['higher_is_better'] else 'lower'} better)" for p, m in section["metrics"].items()
            }
            if name == "words":
                labels = dict.fromkeys(section["metrics"], "words")
            title = f"{section['label']}: mean by method and preference"
            made.append(charts.score_grid(out_dir / CHARTS_DIR / f"{name}_scores.png", title, section["mean"], labels, methods))
        if section.get("win_rate_vs_base"):
            rates = {p: {m: v["win_rate"] for m, v in by.items()} for p, by in section["win_rate_vs_base"].items()}
            title = f"{section['label']}: win rate vs {results['run']['baseline']}"
            made.append(charts.win_rate_chart(out_dir / CHARTS_DIR / f"{name}_win_rate.png", title, rates, methods))
    return [str(p.relative_to(out_dir)) for p in made]


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a stop in the middle (Ctrl-C) leaves the previous file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_report(results: dict[str, Any], out_dir: Path, with_charts: bool = True) -> dict[str, Path]:
    """Write results.json, report.md and the charts; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chart_files = draw_charts(results, out_dir) if with_charts else []
    results = {**results, "charts": chart_files}
    replace_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    replace_text(out_dir / REPORT_FILE, render_markdown(results, chart_files))
    paths = {"results": out_dir / RESULTS_FILE, "report": out_dir / REPORT_FILE}
    paths.update({Path(f).stem: out_dir / f for f in chart_files})
    return paths


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["amulet-eval", *argv])
