"""The product's defaults keep the embedded model's answers readable in both common request shapes.

A user message with a preference and no system message is the most common request; with the paper's
settings alone the embedded model then writes gibberish. This runs the defaults (MethodSettings() and
the chat template's own system prompt for conversations without one) on 20 fixed prompts, greedy, and
scores every answer with the evaluation tool's fluency and degeneration rules (amulet_eval.quality).
"""

from __future__ import annotations

import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import (
    PAPER_SYSTEM_PROMPT,
    TEMPLATE,
    preference_message_pair,
    resolve_default_system_prompt,
)
from amulet_core.method.settings import MethodSettings
from amulet_core.model.chat_template import render_chat, template_default_system_prompt
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams
from amulet_eval.quality import FluencyScorer, degeneration_reasons

PROMPTS = (
    "How do I keep basil alive?",
    "What is the capital of France?",
    "hi",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a budget is to a teenager.",
    "How can I become a better listener?",
    "What is photosynthesis?",
    "Suggest a name for a small bakery.",
    "How do I start learning to play the guitar?",
    "What are the benefits of drinking water?",
    "How do I write a polite email asking for a deadline extension?",
    "Why do cats purr?",
    "What is a good way to learn a new language?",
    "How do I clean a cast iron pan?",
    "What causes rain?",
    "Recommend a hobby for someone who works from home.",
    "How can I save money on groceries?",
)
PREFERENCES = ("concise", "verbose", "formal", "uplifting")
MAX_TOKENS = 64


def _answers(loaded: LoadedModel, system_prompt: str | None) -> list[tuple[list[dict], str]]:
    """(the conversation as sent, the default-settings answer) for every prompt, one preference each."""
    tokenizer = loaded.tokenizer
    default_system = resolve_default_system_prompt(TEMPLATE, template_default_system_prompt(tokenizer))
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=40, max_model_len=1024, max_num_batched_tokens=2048))
    conversations, requests = [], []
    for i, prompt in enumerate(PROMPTS):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        pair = preference_message_pair(messages, PREFERENCES[i % len(PREFERENCES)], default_system)
        request = GenerationRequest(
            str(i),
            tuple(render_chat(tokenizer, pair.pref)),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
            MethodSettings(),
            tuple(render_chat(tokenizer, pair.contrast)),
        )
        requests.append(request)
        conversations.append(messages)
    texts = {str(i): "" for i in range(len(PROMPTS))}

    def step() -> None:
        for out in engine.step():
            texts[out.request_id] += out.text
            assert out.error is None

    # The first request alone for a step: once its prompts are in the KV cache, the leading blocks the others share
    # with them (the system prompt: 1 to 3 blocks a context) are prefix-cache hits, not 39 copies prefilled at once.
    # The answers are the same bits (the CPU engine is batch-invariant); the prefill takes about 5 s less.
    engine.add_request(requests[0])
    step()
    for request in requests[1:]:
        engine.add_request(request)
    while engine.has_work():
        step()
    return [(conversations[i], texts[str(i)]) for i in range(len(PROMPTS))]


LOOP_REASONS = ("a word 4-gram repeated", "over 40% of word 3-grams repeated")


@pytest.mark.smollm
@pytest.mark.parametrize("system_prompt", [None, PAPER_SYSTEM_PROMPT], ids=["user-message-only", "paper-system-prompt"])
def test_default_answers_are_not_degenerate(smollm: LoadedModel, system_prompt: str | None) -> None:
    """No gibberish (fluency below -4, punctuation runs, answers under 5 words) in either shape, and at most
    1 in 20 answers degenerate by any rule: greedy decoding of a 135M model sometimes loops on a phrase
    without any preference too (README, "Choosing the defaults"), which no preference setting removes."""
    scorer = FluencyScorer(smollm)
    degenerate = []
    for messages, text in _answers(smollm, system_prompt):
        reasons = degeneration_reasons(text, scorer.score(messages, text))
        if reasons:
            degenerate.append((messages[-1]["content"], text, reasons))
    incoherent = [d for d in degenerate if any(not r.startswith(LOOP_REASONS) for r in d[2])]
    assert not incoherent, incoherent
    assert len(degenerate) <= len(PROMPTS) // 20, degenerate
