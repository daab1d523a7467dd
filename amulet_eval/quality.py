"""Does an answer still read as language? Fluency under the plain model, and a degeneration check.

Preference decoding can push a small model off anything readable (a large strength A extrapolates
from two nearly equal distributions). These two measures sit next to the preference proxies in every
table, so a setting that "wins" on length by writing gibberish shows up as such.

* **fluency** of an answer: the mean log-probability per token of the answer's tokens under the plain
  model (no preference decoding) given the conversation as the user sent it (no preference sentence),
  rendered by the model's chat template. Base answers of SmolLM2-135M score about -0.6 to -0.8;
  word salad scores below -4.
* **degenerate**: any of the reasons :func:`degeneration_reasons` lists: fluency below -4, fewer
  than 5 words, a word 4-gram repeated 3 or more times, more than 40% of word 3-grams repeated (with
  at least 10 of them), or a run of 4 or more punctuation characters (a markdown table rule excepted).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from amulet_core.model.chat_template import render_chat
from amulet_core.model.loading import LoadedModel

FLUENCY_FLOOR = -4.0
MIN_WORDS = 5
MAX_4GRAM_REPEATS = 2
MAX_3GRAM_REPEAT_SHARE = 0.4
MIN_3GRAMS = 10
PUNCT_RUN = 4

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)?")
_PUNCT_RUN = re.compile(r"[^\w\s]{" + str(PUNCT_RUN) + ",}")


def _is_table_rule(run: str) -> bool:
    return set(run) <= set("|-:") and "|" in run and "-" in run


def degeneration_reasons(text: str, fluency: float | None = None) -> list[str]:
    """Why an answer counts as degenerate (empty: it does not). ``fluency`` None skips that rule."""
    reasons = []
    if fluency is not None and (math.isnan(fluency) or fluency < FLUENCY_FLOOR):
        reasons.append(f"fluency below {FLUENCY_FLOOR:g}")
    if len(text.split()) < MIN_WORDS:
        reasons.append(f"fewer than {MIN_WORDS} words")
    words = _WORD.findall(text.lower())
    grams4 = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    if grams4 and max(grams4.values()) > MAX_4GRAM_REPEATS:
        reasons.append(f"a word 4-gram repeated {max(grams4.values())} times")
    grams3 = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams3) >= MIN_3GRAMS and 1 - len(set(grams3)) / len(grams3) > MAX_3GRAM_REPEAT_SHARE:
        reasons.append(f"over {MAX_3GRAM_REPEAT_SHARE:.0%} of word 3-grams repeated")
    if any(not _is_table_rule(m.group(0)) for m in _PUNCT_RUN.finditer(text)):
        reasons.append(f"a run of {PUNCT_RUN}+ punctuation characters")
    return reasons


class FluencyScorer:
    """Scores answers under the plain model: one forward pass per answer, float32 log-probabilities.

    ``loaded`` is a model as :func:`amulet_core.model.loading.load_model` returns it, used outside the engine
    (plain attention), so give it its own copy rather than the one an engine is decoding with.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @torch.inference_mode()
    def score(self, conversation: Sequence[dict[str, Any]], answer: str) -> float:
        """Mean log-probability per answer token given the conversation; NaN for an empty answer."""
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        prompt = render_chat(tokenizer, conversation)
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            return math.nan
        ids = torch.tensor([prompt + answer_ids], device=self.loaded.device)
        # Only the positions that predict an answer token need the vocabulary projection.
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer_ids) + 1).logits[0, :-1].float()
        targets = torch.tensor(answer_ids, device=logits.device).unsqueeze(1)
        return float(torch.log_softmax(logits, dim=-1).gather(1, targets).mean())


def pooled_quality(
    fluency: dict[tuple[int, str, str], float], degenerate: dict[tuple[int, str, str], float], methods: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Per method over every preference: answers, mean fluency (NaN-free answers), degenerate share."""
    out: dict[str, dict[str, float | int | None]] = {}
    for method in methods:
        flags = [v for k, v in degenerate.items() if k[2] == method]
        scores = [v for k, v in fluency.items() if k[2] == method and not math.isnan(v)]
        if flags:
            out[method] = {
                "n": len(flags),
                "fluency": sum(scores) / len(scores) if scores else None,
                "degenerate": sum(flags) / len(flags),
                "degenerate_count": int(sum(flags)),
            }
    return out
