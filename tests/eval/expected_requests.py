"""What the engine must be asked for each column under joined preferences, a negative and cfg, written out by
hand from the README's rules (not with the code under test), for the HTTP and the in-process runner tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_sentence
from amulet_core.method.settings import Method, MethodSettings

NEG_PROMPT = "Answer in as few words as possible."
PREFERENCES = ("concise", "concise+formal", "concise:2+formal")
"""One preference, two joined presets with equal weights, the same with weights 2:1."""
MEMBERS = {
    "concise": (("concise",), ()),
    "concise+formal": (("concise", "formal"), (1.0, 1.0)),
    "concise:2+formal:1": (("concise", "formal"), (2.0, 1.0)),
}
"""Each stored label: its presets and the weights the request carries (none for one preference)."""
METHODS = ("base", "pref", "amulet", "cfg")
NEGATIVES = (None, "concise")
LABELS = ("base", "pref", "amulet", "amulet-vs-concise", "cfg")

Encode = Callable[[Sequence[dict[str, Any]]], tuple[int, ...]]


def conversation(question: str, sentence: str | None = None) -> list[dict[str, str]]:
    """The paper's system prompt (with a sentence appended after one space) and the question."""
    system = PAPER_SYSTEM_PROMPT if sentence is None else f"{PAPER_SYSTEM_PROMPT} {sentence}"
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def expected_requests(question: str, encode: Encode, guidance_scale: float) -> Counter:
    """(prompt_ids, extra_prompt_ids, contrast_prompt_ids, MethodSettings) of every job of one question."""
    plain = encode(conversation(question))
    out: Counter = Counter()
    for presets, weights in MEMBERS.values():
        prefs = [encode(conversation(question, preference_sentence(p))) for p in presets]
        concise = encode(conversation(question, preference_sentence("concise")))
        out[(plain, (), None, MethodSettings(method=Method.BASE, weights=weights))] += 1
        out[(prefs[0], tuple(prefs[1:]), None, MethodSettings(method=Method.PREF, weights=weights))] += 1
        for contrast in (plain, concise):  # amulet, amulet-vs-concise
            out[(prefs[0], tuple(prefs[1:]), contrast, MethodSettings(weights=weights))] += 1
        # cfg: the conversation as given against the one carrying the negative prompt, whatever the row
        cfg = MethodSettings(method=Method.LA, strength=guidance_scale, plausibility=0.0)
        out[(plain, (), encode(conversation(question, NEG_PROMPT)), cfg)] += 1
    return out
