"""Contrast rows computed at their plausible tokens only (``--contrast-logits``, ``amulet_core.engine.deferred_contrasts``):
through the engine, a step multiplies the output layer for the other rows alone (spied), the requests answer as with
the whole rows (greedy tokens; log-probabilities to rounding), a request without a plausibility mask keeps its whole
row, the 8-bit output layer of the served SmolLM2 answers alike, and the option is parsed and defaulted per device."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.deferred_contrasts import DeferredContrasts
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.packed_forward import LlamaFamilyForward
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel
from amulet_core.model.q8_output import Q8Linear, q8_output_layer
from amulet_core.model.quantization import quantize_model
from server.options import parse_args
from tests.engine.test_engine import drain, tokens_of
from tests.engine.test_multi_context_engine import make

REQUESTS = [
    ("amulet", MethodSettings(method=Method.AMULET), {}),
    ("la", MethodSettings(method=Method.LA, ratio=2.0, plausibility=0.2), {}),
    ("two-prefs", MethodSettings(method=Method.AMULET, weights=(1.0, 2.0)), {}),
    ("no-mask", MethodSettings(method=Method.AMULET, plausibility=0.0), {}),
    ("base", MethodSettings(method=Method.BASE), {}),
    ("digits", MethodSettings(method=Method.AMULET), {"grammar": GrammarSpec(GrammarKind.REGEX, r"[0-9]{2,9}")}),
    ("logprobs", MethodSettings(method=Method.AMULET), {"logprobs": True, "top_logprobs": 3}),
]


def head_rows(engine: LLMEngine) -> list[int]:
    """Spy on the output layer of ``engine``'s family forward: the rows it multiplies, call by call."""
    forward = engine.runner.forward
    assert isinstance(forward, LlamaFamilyForward)
    rows: list[int] = []
    head = forward.head
    original = head.forward

    def spy(x: torch.Tensor) -> torch.Tensor:
        rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return original(x)

    head.forward = spy  # type: ignore[method-assign]
    return rows


def run(loaded, mode: str, requests, spy: bool = False):
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=4096, contrast_logits=mode))
    rows = head_rows(engine) if spy else None
    for request in requests:
        engine.add_request(request)
    try:
        return drain(engine), rows
    finally:
        if spy:
            del engine.runner.forward.head.forward  # type: ignore[attr-defined]


def test_a_lone_amulet_request_multiplies_the_output_layer_once_a_step(tiny_model):
    loaded = tiny_model("llama")
    request = make("a", MethodSettings(method=Method.AMULET), seed=2, max_tokens=8)
    whole, whole_rows = run(loaded, "all", [request], spy=True)
    plausible, plausible_rows = run(loaded, "plausible", [request], spy=True)
    assert tokens_of(plausible["a"]) == tokens_of(whole["a"]) and len(tokens_of(whole["a"])) == 8
    assert whole_rows == [2] * 8  # the prefill's two last positions, then each decode step's two rows
    assert plausible_rows == [1] * 8  # the preference row alone: the contrast's logits at its plausible tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_mixed_batch_answers_as_with_the_whole_rows(tiny_model, family):
    loaded = tiny_model(family)
    requests = []
    for i, (rid, settings, sampling) in enumerate(REQUESTS):
        requests.append(make(rid, settings, seed=10 + i, max_tokens=6, **sampling))
    whole, _ = run(loaded, "all", requests)
    plausible, rows = run(loaded, "plausible", requests, spy=True)
    for rid, *_ in REQUESTS:
        assert whole[rid][-1].error is None and plausible[rid][-1].error is None
        assert tokens_of(plausible[rid]) == tokens_of(whole[rid]), rid
    contexts = sum(r.method.num_contexts for r in requests)
    masked = sum(1 for r in requests if r.method.method in (Method.AMULET, Method.LA) and r.method.plausibility > 0)
    assert rows[0] == contexts - masked  # the first step: every request's rows, less the masked contrasts
    wanted = [lp for out in whole["logprobs"] for lp in out.logprobs or ()]
    got = [lp for out in plausible["logprobs"] for lp in out.logprobs or ()]
    assert [lp.token_id for lp in got] == [lp.token_id for lp in wanted] and wanted
    for a, b in zip(got, wanted, strict=True):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
        assert len(a.top) == 3 and [t[0] for t in a.top] == [t[0] for t in b.top]
        for (_, _, x), (_, _, y) in zip(a.top, b.top, strict=True):
            assert x == y == -math.inf or math.isclose(x, y, abs_tol=1e-4)  # outside the plausible set: -inf alike


@pytest.fixture(scope="module")
def smollm_served(smollm) -> LoadedModel:
    """SmolLM2 as ``make serve`` serves it on a CPU without native bfloat16 (float32, int4-q16, 8-bit output layer)."""
    model = copy.deepcopy(smollm.model)
    quantize_model(model, "int4-q16", exact_only=True)
    assert q8_output_layer(model) is not None
    return LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, torch.float32, smollm.eos_token_ids)


@pytest.mark.smollm
def test_the_served_8_bit_output_layer_answers_alike(smollm_served):
    """The embedded SmolLM2 as served (its 8-bit output layer computes a contrast row's plausible tokens with the
    bits of the whole row): an amulet request's greedy answer is the same with and without the saving."""
    assert isinstance(smollm_served.model.get_output_embeddings(), Q8Linear)
    request = make("a", MethodSettings(method=Method.AMULET), seed=4, max_tokens=16)
    whole, _ = run(smollm_served, "all", [request])
    plausible, rows = run(smollm_served, "plausible", [request], spy=True)
    assert tokens_of(plausible["a"]) == tokens_of(whole["a"])
    assert rows[-1] == 1


def test_the_option_is_checked_and_defaults_per_device():
    assert EngineConfig().contrast_logits == "auto"
    assert EngineConfig().plausible_contrasts_on("cpu") and not EngineConfig().plausible_contrasts_on("cuda")
    assert EngineConfig(contrast_logits="plausible").plausible_contrasts_on("cuda")
    assert not EngineConfig(contrast_logits="all").plausible_contrasts_on("cpu")
    with pytest.raises(ValueError, match="contrast_logits"):
        EngineConfig(contrast_logits="some")  # type: ignore[arg-type]
    assert parse_args([], environ={}).engine.contrast_logits == "auto"
    assert parse_args(["--contrast-logits", "all"], environ={}).engine.contrast_logits == "all"
    with pytest.raises(SystemExit):
        parse_args(["--contrast-logits", "some"], environ={})


def test_the_start_up_log_says_which_logits_contrast_rows_get(tiny_model, caplog):
    loaded = tiny_model("llama")
    with caplog.at_level("INFO"):
        LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=1024))
    assert "contrast rows' logits (--contrast-logits auto): at their plausible tokens only" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=1024, contrast_logits="all"))
    assert "contrast rows' logits (--contrast-logits all): the whole vocabulary's" in caplog.text


def test_undone_rows_follow_their_requests_when_the_step_drops_some():
    """The engine drops requests finished by the step in flight from a step's logits (overlap): the undone rows are
    renumbered with them, the others' forgotten."""
    hidden = {1: torch.tensor([1.0]), 3: torch.tensor([3.0])}
    contrasts = DeferredContrasts(hidden, lambda x, tokens: x.repeat(len(tokens)))
    kept = contrasts.select([3, 0, 1])
    assert kept is not None and kept.rows == frozenset({0, 2})
    assert kept.logits_at(0, [5, 6]).tolist() == [3.0, 3.0] and kept.logits_at(2, [9]).tolist() == [1.0]
    assert contrasts.select([0, 2]) is None
