"""Proxy metrics: cheap, CPU-only, download-free stand-ins for "does the answer follow the preference".

They are proxies, not judgements of quality: each measures one surface feature that the preset
asks for, and says nothing about helpfulness or correctness.

* concise / verbose: length in words (lower / higher is better);
* uplifting / pleasant: VADER sentiment, compound score in [-1, 1] (higher is better);
* complex / formal: Flesch-Kincaid grade level from ``textstat`` (higher is better);
* creative: distinct-2, the share of distinct word bigrams (higher is better; type-token ratio
  is recorded too).

sycophantic and free-text preferences have no proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import textstat
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    higher_is_better: bool

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


WORDS = "words"
SENTIMENT = "sentiment"
GRADE = "grade"
DISTINCT2 = "distinct2"
TTR = "ttr"

METRIC_INFO: dict[str, tuple[str, str]] = {
    WORDS: ("length in words", "words"),
    SENTIMENT: ("VADER sentiment (compound, -1..1)", "vaderSentiment"),
    GRADE: ("Flesch-Kincaid grade level", "textstat"),
    DISTINCT2: ("distinct-2 (distinct word bigrams / bigrams)", "distinct-n"),
    TTR: ("type-token ratio (distinct words / words)", "distinct-n"),
}

_MATCHED: dict[str, tuple[str, bool]] = {
    "concise": (WORDS, False),
    "verbose": (WORDS, True),
    "uplifting": (SENTIMENT, True),
    "pleasant": (SENTIMENT, True),
    "complex": (GRADE, True),
    "formal": (GRADE, True),
    "creative": (DISTINCT2, True),
}


def matched_metric(preference: str) -> Metric | None:
    """The proxy that fits a preset preference, or None (sycophantic, free text)."""
    match = _MATCHED.get(preference.strip().lower())
    if match is None:
        return None
    name, higher = match
    return Metric(name, METRIC_INFO[name][0], higher)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters or digits, with inner apostrophes and hyphens."""
    return [w.lower() for w in _WORD.findall(text)]


def word_count(text: str) -> int:
    return len(words(text))


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct word n-grams over all word n-grams (0 when the text has fewer than n words)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def type_token_ratio(text: str) -> float:
    """Distinct words over words (0 for a text without words)."""
    tokens = words(text)
    return len(set(tokens)) / len(tokens) if tokens else 0.0


def readability_grade(text: str) -> float:
    """Flesch-Kincaid grade level (textstat); 0 for a text without words."""
    return float(textstat.flesch_kincaid_grade(text)) if words(text) else 0.0


class ProxyScorer:
    """Computes every proxy metric of an answer (the VADER lexicon loads once per scorer)."""

    def __init__(self) -> None:
        self._vader = SentimentIntensityAnalyzer()

    def sentiment(self, text: str) -> float:
        return float(self._vader.polarity_scores(text)["compound"])

    def score(self, text: str) -> dict[str, float]:
        return {
            WORDS: float(word_count(text)),
            SENTIMENT: self.sentiment(text),
            GRADE: readability_grade(text),
            DISTINCT2: distinct_n(text, 2),
            TTR: type_token_ratio(text),
        }
