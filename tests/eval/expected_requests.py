"""What the engine must be asked for each column under joined preferences, a negative and cfg, written out by
hand from the README's rules (not with the code under test), for the HTTP and the in-process runner tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, Placement, preference_sentence
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


def conversation(question: str, sentence: str | None = None, placement: Placement = Placement.SYSTEM) -> list[dict[str, str]]:
    """The paper's system prompt and the question, with a sentence appended to the system prompt after one space
    (system placement) or to the question after a blank line (end placement)."""
    system, user = PAPER_SYSTEM_PROMPT, question
    if sentence is not None and placement is Placement.SYSTEM:
        system = f"{PAPER_SYSTEM_PROMPT} {sentence}"
    elif sentence is not None:
        user = f"{question}\n\n{sentence}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def expected_requests(question: str, encode: Encode, guidance_scale: float, placement: Placement) -> Counter:
    """(prompt_ids, extra_prompt_ids, contrast_prompt_ids, MethodSettings) of every job of one question, the
    sentences placed as ``placement`` says."""

    def with_sentence(sentence: str | None) -> tuple[int, ...]:
        return encode(conversation(question, sentence, placement))

    plain = with_sentence(None)
    out: Counter = Counter()
    for presets, weights in MEMBERS.values():
        prefs = [with_sentence(preference_sentence(p)) for p in presets]
        concise = with_sentence(preference_sentence("concise"))
        out[(plain, (), None, MethodSettings(method=Method.BASE, weights=weights))] += 1
        out[(prefs[0], tuple(prefs[1:]), None, MethodSettings(method=Method.PREF, weights=weights))] += 1
        for contrast in (plain, concise):  # amulet, amulet-vs-concise
            out[(prefs[0], tuple(prefs[1:]), contrast, MethodSettings(weights=weights))] += 1
        # cfg: the conversation as given against the one carrying the negative prompt, whatever the row
        cfg = MethodSettings(method=Method.LA, strength=guidance_scale, plausibility=0.0)
        out[(plain, (), with_sentence(NEG_PROMPT), cfg)] += 1
    return out
