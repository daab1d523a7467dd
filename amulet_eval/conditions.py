"""Preference conditions: what one ``--preferences`` entry asks for.

An entry is one preference (a preset name or free text, as before) or several presets joined by ``+``,
e.g. ``concise+formal``: one multi-preference condition, decoded with one preference context per member
(the server's ``preference`` list). Members weigh the same unless written ``name:weight``
(``concise:2+formal``); the weights are normalised when decoding, so only their ratio matters.

A ``+`` joins preset names only: an entry whose ``+``-separated parts are not all presets (``Use C++.``)
is one free-text preference, kept as written. The condition's canonical ``label`` (lower-case presets,
weights written only when they differ) names it in ``generations.jsonl`` and in the report, and parses
back to the same condition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import PRESETS, preference_sentence

JOIN = "+"
WEIGHT = ":"


@dataclass(frozen=True)
class Condition:
    """One row of the evaluation: K >= 1 preference texts and their weights (one each)."""

    label: str
    texts: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def joined(self) -> bool:
        """Whether the condition has several preference contexts."""
        return len(self.texts) > 1

    @property
    def sentence(self) -> str:
        """What the condition asks, for a reader (the judge, a reward model): every member's sentence in turn."""
        return " ".join(preference_sentence(t) for t in self.texts)


def _weight(entry: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameterError("preferences", f"{entry!r}: a weight must be a finite number above 0, got {text!r}.")
    return value


def _number(value: float) -> str:
    """A weight as written in a label: short (``2``, ``0.5``), and parsing back to the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _member(part: str) -> tuple[str, str | None] | None:
    """(preset, weight text or None) of one ``+``-separated part, or None when it is not a preset."""
    name, sep, weight = part.strip().partition(WEIGHT)
    name = name.strip().lower()
    if name not in PRESETS:
        return None
    return name, weight.strip() if sep else None


def parse_condition(entry: str) -> Condition:
    """The condition of one ``--preferences`` entry (or of a stored label); raises InvalidParameterError when
    it is empty, too long, names a preset twice or gives a bad weight. (Distinct presets are at most 8, the
    engine's MAX_PREFERENCES; a server may allow fewer, ``--max-preferences``, and then refuses the request.)"""
    preference_sentence(entry)  # validates: a non-empty string, not too long
    text = entry.strip()
    members = [_member(p) for p in text.split(JOIN)]
    if any(m is None for m in members):
        return Condition(text, (text,), (1.0,))  # free text (a "+" in it is just a character)
    names = [m[0] for m in members if m is not None]
    weights = [1.0 if m is None or m[1] is None else _weight(text, m[1]) for m in members]
    if len(names) == 1:
        if members[0] is not None and members[0][1] is not None:
            raise InvalidParameterError(
                "preferences", f"{text!r}: a weight only matters between joined presets (e.g. concise:2+formal)."
            )
        return Condition(names[0], (names[0],), (1.0,))
    if len(set(names)) != len(names):
        raise InvalidParameterError("preferences", f"{text!r} names a preset twice.")
    if len(set(weights)) == 1:
        return Condition(JOIN.join(names), tuple(names), (1.0,) * len(names))
    label = JOIN.join(f"{n}{WEIGHT}{_number(w)}" for n, w in zip(names, weights, strict=True))
    return Condition(label, tuple(names), tuple(weights))


def condition_sentence(label: str) -> str:
    """The preference sentence(s) of a condition label, for a reader (free text is kept as written)."""
    return parse_condition(label).sentence
