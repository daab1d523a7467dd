"""Structured outputs in the engine, on a tiny random-weight Llama with SmolLM2's tokenizer: whatever the
weights prefer, the output follows the grammar, and the request stops when the grammar is complete."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import weakref

import pytest
import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import ModelConfig
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, make_request, prompts, tokens_of

EOS = 2
SCHEMA = {
    "type": "object",
    # n bounded: a random model sampled at temperature 1 may keep writing digits (once 40 of them, past max_tokens)
    "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": -9999, "maximum": 9999}},
    "required": ["colour", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
BASE = MethodSettings(method=Method.BASE)
AMULET = MethodSettings(method=Method.AMULET)  # the default plausibility mask (0.5) on
AMULET_UNMASKED = MethodSettings(method=Method.AMULET, plausibility=0.0)


@pytest.fixture
def engine(tiny_model):
    return LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=8192))


def generate(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, tuple[str, str | None, list[int]]]:
    """Each request's (text, finish reason, tokens), all of them decoded together."""
    for r in requests:
        engine.add_request(r)
    outputs = drain(engine)
    assert not engine.requests
    return {rid: ("".join(o.text for o in outs), outs[-1].finish_reason, tokens_of(outs)) for rid, outs in outputs.items()}


def request(rid: str, settings: MethodSettings, grammar: GrammarSpec | None, seed: int = 0, **sampling) -> GenerationRequest:
    pref, base = prompts(seed, 12, 5, 2)
    return make_request(rid, settings, pref, base, max_tokens=sampling.pop("max_tokens", 48), grammar=grammar, **sampling)


def assert_follows_schema(text: str) -> None:
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"colour", "n"}, text
    assert value["colour"] in ("red", "green") and isinstance(value["n"], int) and not isinstance(value["n"], bool)
    assert -9999 <= value["n"] <= 9999, text


@pytest.mark.parametrize("settings", [BASE, AMULET, AMULET_UNMASKED], ids=["base", "amulet", "amulet-no-plausibility"])
def test_a_json_schema_is_followed_greedily_and_sampled(engine, settings):
    requests = [request("greedy", settings, JSON_SCHEMA)]
    requests += [request(f"seed{s}", settings, JSON_SCHEMA, seed=s, temperature=1.0) for s in range(4)]
    results = generate(engine, requests)
    for rid, (text, reason, tokens) in results.items():
        assert reason == "stop", (rid, text, reason)
        assert_follows_schema(text)
        assert EOS not in tokens  # the grammar completed: the request stopped without waiting for EOS


def test_unconstrained_the_model_writes_no_json(engine):
    """The grammar is what makes the outputs above JSON: the random model alone writes none."""
    text, _, _ = generate(engine, [request("free", BASE, None, max_tokens=12)])["free"]
    with pytest.raises(ValueError):
        json.loads(text)


def test_choice_regex_lark_and_json_object(engine):
    choices = ["north", "south", "east or west"]
    lark = 'start: "call(" NAME ")"\nNAME: /[a-z]{1,8}/'
    specs = {
        "choice": GrammarSpec(GrammarKind.CHOICE, json.dumps(choices)),
        "regex": GrammarSpec(GrammarKind.REGEX, r"[0-9]{2,4}-[A-Z]{2}"),
        "lark": GrammarSpec(GrammarKind.LARK, lark),
        "object": GrammarSpec(GrammarKind.JSON_OBJECT),
    }
    requests = [
        request(f"{name}-{s}", AMULET, spec, seed=s, temperature=1.0 if s else 0.0)
        for name, spec in specs.items()
        for s in range(3)
    ]
    results = generate(engine, requests)
    for rid, (text, reason, _) in results.items():
        name = rid.split("-")[0]
        if name == "choice":
            assert text in choices and reason == "stop", (rid, text)
        elif name == "regex":
            assert re.fullmatch(r"[0-9]{2,4}-[A-Z]{2}", text) and reason == "stop", (rid, text)
        elif name == "lark":
            assert re.fullmatch(r"call\([a-z]{1,8}\)", text) and reason == "stop", (rid, text)
        elif reason == "stop":  # any object may run past max_tokens; one that stops is complete
            assert isinstance(json.loads(text), dict), (rid, text)
        else:
            assert reason == "length" and text.startswith("{"), (rid, text)
    assert any(results[f"object-{s}"][1] == "stop" for s in range(3))


def test_eos_is_allowed_only_where_the_grammar_may_end(engine):
    """A huge EOS bias cannot end the request before the grammar accepts, and ends it as soon as it does."""
    spec = GrammarSpec(GrammarKind.REGEX, "[a-z]+")
    text, reason, tokens = generate(engine, [request("eos", BASE, spec, logit_bias=((EOS, 100.0),))])["eos"]
    assert reason == "stop" and len(tokens) == 2 and tokens[-1] == EOS
    assert re.fullmatch("[a-z]+", text) and engine.grammars().eos_token == EOS


def test_unconstrained_requests_decode_as_alone_beside_constrained_ones(tiny_model):
    def run(with_constrained: bool) -> dict[str, list[int]]:
        engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=8192))
        requests = [
            request("free-base", BASE, None, seed=7, max_tokens=16),
            request("free-amulet", AMULET, None, seed=8, max_tokens=16),
        ]
        if with_constrained:
            requests += [request("json", AMULET, JSON_SCHEMA, seed=9), request("json-base", BASE, JSON_SCHEMA, seed=10)]
        results = generate(engine, requests)
        if with_constrained:
            assert_follows_schema(results["json"][0])
            assert_follows_schema(results["json-base"][0])
        return {rid: tokens for rid, (_, _, tokens) in results.items() if rid.startswith("free")}

    assert run(with_constrained=True) == run(with_constrained=False)


def test_a_token_the_grammar_refuses_fails_its_request_alone(engine):
    engine.add_request(request("bad", BASE, JSON_SCHEMA))
    engine.add_request(request("good", BASE, JSON_SCHEMA, seed=3))
    engine.requests["bad"].matcher.accept = lambda token: False  # as if the sampler broke the grammar
    outputs = drain(engine)
    assert outputs["bad"][-1].finish_reason == "error" and "breaks the grammar of 'response_format'" in outputs["bad"][-1].error
    assert outputs["good"][-1].finish_reason == "stop"
    assert_follows_schema("".join(o.text for o in outputs["good"]))


def test_finishing_or_aborting_drops_the_matcher(engine):
    engine.add_request(request("done", BASE, JSON_SCHEMA))
    engine.add_request(request("aborted", BASE, JSON_SCHEMA, seed=2))
    refs = {rid: weakref.ref(engine.requests[rid].matcher) for rid in ("done", "aborted")}
    engine.step()
    assert engine.abort("aborted").finish_reason == "abort"
    drain(engine)
    gc.collect()
    assert refs["done"]() is None and refs["aborted"]() is None


def test_a_repeated_grammar_is_compiled_once(engine):
    generate(engine, [request(f"r{i}", BASE, JSON_SCHEMA, seed=i, max_tokens=4) for i in range(3)])
    assert engine.grammars().compiles == 1


# ---------------------------------------------------------------- refused before queueing, from AsyncEngine.generate


@pytest.fixture
def async_engine(tiny_model):
    loaded = tiny_model("llama")
    threads = ModelConfig(cpu_threads=torch.get_num_threads())
    eng = AsyncEngine(threads, EngineConfig(max_model_len=256, kv_cache_tokens=4096), loader=lambda _: loaded).start()
    eng.wait_ready(60)
    yield eng
    eng.close()


async def collect(engine: AsyncEngine, r: GenerationRequest):
    return [o async for o in engine.generate(r)]


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        ({"logit_bias": ((10**6, 1.0),)}, "logit_bias"),
        ({"grammar": GrammarSpec(GrammarKind.REGEX, "a(b")}, "response_format"),
        ({"grammar": GrammarSpec(GrammarKind.LARK, "start: nothing", param="tool_choice")}, "tool_choice"),
        ({"grammar": GrammarSpec(GrammarKind.CHOICE, "[]", param="guided_choice")}, "guided_choice"),
    ],
)
def test_generate_refuses_an_invalid_request_before_queueing_it(async_engine, sampling, param):
    bad = GenerationRequest("bad", (100, 101, 102), SamplingParams(max_tokens=4, **sampling))
    with pytest.raises(InvalidParameterError) as caught:
        asyncio.run(collect(async_engine, bad))
    assert caught.value.param == param
    assert async_engine.engine.stats().steps == 0 and not async_engine.engine.requests
    good = GenerationRequest("good", (100, 101, 102), SamplingParams(max_tokens=48, temperature=0, grammar=JSON_SCHEMA))
    outs = asyncio.run(collect(async_engine, good))
    assert outs[-1].finish_reason == "stop"
    assert_follows_schema("".join(o.text for o in outs))
