"""Scores of every answer: the proxy metrics (all of them, and the one matched to each preference) and,
when configured, a reward model's score."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tqdm import tqdm

from amulet_eval.compare import Key
from amulet_eval.proxies import METRIC_INFO, Metric, ProxyScorer, matched_metric
from amulet_eval.store import Row

PROXY = "proxy"
REWARD = "reward"


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


def proxy_score_set(rows: Mapping[Key, Row], metrics: Mapping[Key, Mapping[str, float]]) -> ScoreSet:
    """The proxy matched to each preference (concise/verbose: words, ...); unmatched preferences are left out."""
    matched: dict[str, Metric] = {}
    for pref in {k[1] for k in rows}:
        metric = matched_metric(pref)
        if metric is not None:
            matched[pref] = metric
    values = {k: float(metrics[k][matched[k[1]].name]) for k in rows if k[1] in matched}
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
