"""A reasoning model's thinking in the engine (``GenerationRequest.thinking``), on a tiny random Llama with
SmolLM2's tokenizer: inside the thinking a preference request decodes from its preference context alone (the
closed form with A = 1: the ``pref`` method's tokens), and the grammar waits; from the token after the end
token on, the method and the grammar apply as they would to a prompt that held the thinking."""

from __future__ import annotations

import re

import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest, ThinkingSpan
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, make_request, prompts, tokens_of

AMULET = MethodSettings(method=Method.AMULET)
PREF = MethodSettings(method=Method.PREF)
NEW_TOKENS = 14


@pytest.fixture
def engine(tiny_model) -> LLMEngine:
    return LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=4096))


def run(engine: LLMEngine, request: GenerationRequest) -> tuple[list[int], str]:
    engine.add_request(request)
    outputs = drain(engine)[request.request_id]
    return tokens_of(outputs), "".join(o.text for o in outputs)


def with_thinking(request: GenerationRequest, span: ThinkingSpan) -> GenerationRequest:
    return GenerationRequest.from_contexts(request.request_id, request.contexts, request.sampling, request.method, thinking=span)


def closing_position(tokens: list[int], at_least: int = 3) -> int:
    """A position whose token appears nowhere before it (so that, made the end token, it ends the thinking there)."""
    return next(k for k in range(at_least, len(tokens)) if tokens[k] not in tokens[:k])


def test_the_thinking_is_decoded_without_the_contrast_then_the_method_applies(engine: LLMEngine) -> None:
    pref, base = prompts(7, shared=20, pref_extra=6, base_extra=2)
    free, _ = run(engine, make_request("pref", PREF, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True))
    plain, _ = run(engine, make_request("amulet", AMULET, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert plain[:4] != free[:4]  # the contrast changes this model's greedy tokens at once: the test can tell
    k = closing_position(free)
    span = ThinkingSpan(end_token_id=free[k], open_at_start=True)
    request = make_request("gated", AMULET, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True)
    gated, _ = run(engine, with_thinking(request, span))
    assert gated[: k + 1] == free[: k + 1]  # the thinking, its end token included: the preference context alone
    thought = tuple(free[: k + 1])
    rest = make_request("after", AMULET, pref + thought, base + thought, max_tokens=NEW_TOKENS - k - 1, ignore_eos=True)
    assert gated[k + 1 :] == run(engine, rest)[0]  # then amulet, as on a prompt that held the thinking


def test_a_first_token_that_opens_the_thinking_and_a_grammar_that_waits_for_its_end(engine: LLMEngine) -> None:
    pref, base = prompts(11, shared=16, pref_extra=4, base_extra=1)
    free, _ = run(engine, make_request("pref", PREF, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True))
    k = closing_position(free)
    span = ThinkingSpan(end_token_id=free[k], start_token_id=free[0])  # the model opens it with its first token
    grammar = GrammarSpec(GrammarKind.REGEX, r"[0-9]{2,4}-[A-Z]{2}")
    request = make_request("gated", AMULET, pref, base, max_tokens=NEW_TOKENS + 12, grammar=grammar)
    gated, text = run(engine, with_thinking(request, span))
    assert gated[: k + 1] == free[: k + 1]  # unconstrained thinking (the grammar would refuse these tokens)
    answer = engine.tokenizer.decode(gated[k + 1 :], skip_special_tokens=True)
    assert re.fullmatch(r"[0-9]{2,4}-[A-Z]{2}", answer), (answer, text)


def test_without_an_opening_token_the_method_and_grammar_apply_from_the_start(engine: LLMEngine) -> None:
    pref, base = prompts(11, shared=16, pref_extra=4, base_extra=1)
    plain, _ = run(engine, make_request("plain", AMULET, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True))
    never = ThinkingSpan(end_token_id=plain[0], start_token_id=None)  # not open, nothing opens it
    request = make_request("gated", AMULET, pref, base, max_tokens=NEW_TOKENS, ignore_eos=True)
    assert run(engine, with_thinking(request, never))[0] == plain


def test_sampling_params_are_untouched(engine: LLMEngine) -> None:
    """The span is the request's; a finished request leaves no thinking state behind."""
    pref, base = prompts(3, shared=8, pref_extra=2, base_extra=1)
    request = with_thinking(make_request("r", AMULET, pref, base, max_tokens=4, ignore_eos=True), ThinkingSpan(5, None, True))
    assert request.sampling == SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    run(engine, request)
    assert not engine.requests
