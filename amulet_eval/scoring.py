"""Scores of every answer: the proxy metrics (all of them, and the one matched to each preference) and,
when configured, a reward model's score."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from amulet_eval.compare import Key
from amulet_eval.conditions import parse_condition
from amulet_eval.generate import conversation
from amulet_eval.proxies import METRIC_INFO, Metric, ProxyScorer, matched_metric
from amulet_eval.quality import FluencyScorer, degeneration_reasons
from amulet_eval.store import Row

PROXY = "proxy"
REWARD = "reward"
FLUENCY = "fluency"
DEGENERATE = "degenerate"


@dataclass(frozen=True)
class ScoreSet:
    """One scorer's number for each answer, and how to read it for each preference."""

    name: str
    label: str
    is_proxy: bool
    metrics: dict[str, Metric]
    """Per preference: what the number is and which way is better (preferences without one are left out)."""
    values: dict[Key, float]

    def higher_is_better(self, preference: str) -> bool:
        return self.metrics[preference].higher_is_better


def proxy_metrics(rows: Mapping[Key, Row]) -> dict[Key, dict[str, float]]:
    """Every proxy metric of every answer."""
    scorer = ProxyScorer()
    return {key: scorer.score(str(row["response"])) for key, row in rows.items()}


def proxy_rows(preference: str) -> list[tuple[str, str, Metric]]:
    """The proxy rows of a condition: (row name, member preset, metric) for each member that has a proxy.

    One preference keeps its own name (``concise``: words). A joined condition gets one row per member,
    named ``<condition> [<member>]`` (``concise+formal [concise]``: words, ``concise+formal [formal]``: grade):
    each member's metric on the same answers, never blended into one number."""
    condition = parse_condition(preference)
    out = []
    for text in condition.texts:
        metric = matched_metric(text)
        if metric is not None:
            out.append((f"{preference} [{text}]" if condition.joined else preference, text, metric))
    return out


def proxy_preferences(preferences: Sequence[str]) -> list[str]:
    """The proxy table's rows, in the order of the preferences (joined conditions expand to one row per member)."""
    return [name for pref in preferences for name, _, _ in proxy_rows(pref)]


def proxy_score_set(rows: Mapping[Key, Row], metrics: Mapping[Key, Mapping[str, float]]) -> ScoreSet:
    """The proxy matched to each preference (concise/verbose: words, ...), keyed by proxy row (see :func:`proxy_rows`);
    preferences and members without a proxy are left out."""
    matched: dict[str, Metric] = {}
    values: dict[Key, float] = {}
    by_pref = {pref: proxy_rows(pref) for pref in {k[1] for k in rows}}
    for key in rows:
        for name, _, metric in by_pref[key[1]]:
            matched[name] = metric
            values[(key[0], name, key[2])] = float(metrics[key][metric.name])
    return ScoreSet(PROXY, "Proxy metric matched to the preference", True, matched, values)


def length_score_set(metrics: Mapping[Key, Mapping[str, float]]) -> ScoreSet:
    """Answer length in words under every preference (a description, not a scorer: no direction is implied)."""
    prefs = {k[1] for k in metrics}
    metric = Metric("words", METRIC_INFO["words"][0], True)
    return ScoreSet(
        "words", "Answer length in words", True, dict.fromkeys(prefs, metric), {k: v["words"] for k, v in metrics.items()}
    )


def reward_score_set(rows: Mapping[Key, Row], model, progress: bool = True) -> ScoreSet:
    """The reward model's score of every answer (higher is better under every preference)."""
    values: dict[Key, float] = {}
    for key, row in tqdm(sorted(rows.items()), desc="reward model", unit="answer", disable=not progress):
        values[key] = model.score(str(row["question"]), key[1], str(row["response"]))
    metric = Metric(REWARD, f"reward model {model.name}", True)
    prefs = {k[1] for k in rows}
    return ScoreSet(REWARD, f"Reward model ({model.name})", False, dict.fromkeys(prefs, metric), values)


def fluency_score_set(values: Mapping[Key, float]) -> ScoreSet:
    """Fluency of every answer under the plain model (see amulet_eval.quality); NaN answers left out."""
    kept = {k: v for k, v in values.items() if not math.isnan(v)}
    metric = Metric(FLUENCY, "mean log-prob per token under the plain model", True)
    prefs = {k[1] for k in values}
    return ScoreSet(FLUENCY, "Fluency under the plain model", True, dict.fromkeys(prefs, metric), kept)


def degenerate_score_set(values: Mapping[Key, float]) -> ScoreSet:
    """1 for a degenerate answer, 0 otherwise, so the mean is the degenerate share."""
    metric = Metric(DEGENERATE, "share of degenerate answers", False)
    prefs = {k[1] for k in values}
    return ScoreSet(DEGENERATE, "Degenerate answers", True, dict.fromkeys(prefs, metric), dict(values))


def answer_quality(
    rows: Mapping[Key, Row], system_prompt: str, scorer: FluencyScorer | None, progress: bool = True
) -> tuple[dict[Key, float], dict[Key, list[str]]]:
    """(fluency of every answer, or nothing without a scorer; why each answer is degenerate, [] if it is not)."""
    fluency: dict[Key, float] = {}
    if scorer is not None:
        for key, row in tqdm(sorted(rows.items()), desc="fluency", unit="answer", disable=not progress):
            fluency[key] = scorer.score(conversation(system_prompt, str(row["question"])), str(row["response"]))
    reasons = {key: degeneration_reasons(str(row["response"]), fluency.get(key)) for key, row in rows.items()}
    return fluency, reasons
