"""Structured outputs in the core: grammar specs, the compiler's cache, and the batched masks against llguidance itself."""

from __future__ import annotations

import json
import math

import llguidance
import numpy as np
import pytest
import torch

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.compiler import GrammarCompiler, grammar_text
from amulet_core.grammar.masks import apply_grammar_masks, grammar_masks
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.combination import combine_contexts_float32
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer"}},
    "required": ["colour", "n"],
    "additionalProperties": False,
}
VALID = [
    GrammarSpec(GrammarKind.JSON_OBJECT),
    GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    GrammarSpec(GrammarKind.REGEX, r"[0-9]{3}-[a-z]{2,3}"),
    GrammarSpec(GrammarKind.CHOICE, json.dumps(["yes", "no", 'say "café"'])),
    GrammarSpec(GrammarKind.LARK, 'start: "call(" NAME ")"\nNAME: /[a-z_]+/'),
]
PADDING = 64
"""The models here have this many output rows past the tokenizer's vocabulary."""


@pytest.fixture(scope="module")
def compiler(smollm_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer) + PADDING)


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def matches(compiler: GrammarCompiler, tokenizer, spec: GrammarSpec, text: str) -> bool:
    """Whether ``text``'s tokens are accepted by a fresh matcher and leave it finished."""
    matcher = compiler.matcher(spec)
    return all(matcher.accept(t) for t in ids(tokenizer, text)) and matcher.is_finished


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", VALID, ids=lambda s: s.kind.value)
def test_each_kind_gives_a_grammar_llguidance_validates(spec, compiler):
    grammar = grammar_text(spec)
    assert isinstance(grammar, str) and grammar
    assert llguidance.LLMatcher.validate_grammar(grammar, compiler.tokenizer) == ""


def test_each_kind_constrains_as_its_source_says(compiler, smollm_tokenizer):
    tok = smollm_tokenizer
    json_object, schema, regex, choice, lark = VALID
    assert matches(compiler, tok, json_object, '{"a":[1,{"b":null}]}')
    assert not matches(compiler, tok, json_object, "[1]")
    assert matches(compiler, tok, schema, '{"colour":"red","n":-12}')
    assert not matches(compiler, tok, schema, '{"colour":"blue","n":1}')
    assert not matches(compiler, tok, schema, '{"colour":"red"}')
    assert not matches(compiler, tok, schema, '{"colour": "red", "n": 1}')  # compact JSON (JSON_OPTIONS)
    assert matches(compiler, tok, regex, "123-abc") and not matches(compiler, tok, regex, "12-abc")
    assert all(matches(compiler, tok, choice, c) for c in ("yes", "no", 'say "café"'))
    assert not matches(compiler, tok, choice, "maybe")
    assert matches(compiler, tok, lark, "call(get_weather)") and not matches(compiler, tok, lark, "call(Get)")


def test_a_kind_may_be_given_by_its_value():
    assert GrammarSpec("regex", "a").kind is GrammarKind.REGEX  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "source", "words"),
    [
        ("xml", "", "Unknown grammar kind"),
        (GrammarKind.JSON_SCHEMA, "{not json", "not valid JSON"),
        (GrammarKind.JSON_SCHEMA, "[1, 2]", "must be a JSON object"),
        (GrammarKind.CHOICE, "[]", "non-empty list of strings"),
        (GrammarKind.CHOICE, '["a", 1]', "non-empty list of strings"),
        (GrammarKind.CHOICE, '{"a": 1}', "non-empty list of strings"),
        (GrammarKind.CHOICE, "", "not valid JSON"),
    ],
)
def test_a_malformed_source_is_an_error_naming_the_param(kind, source, words):
    with pytest.raises(InvalidParameterError) as caught:
        grammar_text(GrammarSpec(kind, source, param="tool_choice"))
    assert caught.value.param == "tool_choice" and words in caught.value.message


def test_sampling_params_take_only_a_grammar_spec():
    spec = VALID[2]
    assert SamplingParams(grammar=spec).grammar is spec
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(grammar={"type": "regex"})  # type: ignore[arg-type]
    assert caught.value.param == "grammar"


# ---------------------------------------------------------------- the compiler and its cache


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (GrammarSpec(GrammarKind.REGEX, "a(b", param="guided_regex"), "unclosed group"),
        (GrammarSpec(GrammarKind.LARK, "start: foo", param="tools"), "unknown name"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "bogus"}'), "bogus"),
        (GrammarSpec(GrammarKind.JSON_SCHEMA, "{oops", param="response_format"), "not valid JSON"),
    ],
)
def test_an_uncompilable_grammar_is_an_error_naming_the_param(compiler, spec, words):
    with pytest.raises(InvalidParameterError) as caught:
        compiler.check(spec)
    assert caught.value.param == spec.param and words in caught.value.message
    with pytest.raises(InvalidParameterError):
        compiler.matcher(spec)


def test_the_cache_compiles_a_spec_once(smollm_tokenizer):
    compiler = GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer), cache_size=2)
    a, b, c = (GrammarSpec(GrammarKind.REGEX, r) for r in ("a+", "b+", "c+"))
    compiler.check(a)
    compiler.check(a)
    compiler.matcher(a)
    compiler.check(GrammarSpec(GrammarKind.REGEX, "a+", param="other"))  # same grammar, another field
    info = compiler.cache_info()
    assert (info.compiles, info.hits, info.size) == (1, 3, 1)
    compiler.check(b)
    compiler.check(a)  # a is now the most recently used, b the least
    compiler.check(c)  # evicts b
    assert compiler.compiles == 3
    compiler.check(a)
    assert compiler.compiles == 3
    compiler.check(b)
    assert compiler.compiles == 4 and compiler.cache_info().size == 2


def test_a_failure_is_cached_and_raised_with_the_asking_param(smollm_tokenizer):
    compiler = GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer))
    for param in ("response_format", "tool_choice"):
        with pytest.raises(InvalidParameterError) as caught:
            compiler.check(GrammarSpec(GrammarKind.REGEX, "a(b", param=param))
        assert caught.value.param == param
    assert compiler.compiles == 1


def test_matchers_of_one_spec_are_independent(compiler, smollm_tokenizer):
    spec = VALID[3]
    first, second = compiler.matcher(spec), compiler.matcher(spec)
    assert all(first.accept(t) for t in ids(smollm_tokenizer, "yes")) and first.is_finished
    assert not second.is_finished and all(second.accept(t) for t in ids(smollm_tokenizer, "no"))
    third = compiler.matcher(spec)
    assert not third.accept(ids(smollm_tokenizer, "maybe")[0])
    assert third.error is not None and not third.is_finished


def test_the_smollm_eos_is_im_end(compiler, smollm_tokenizer):
    assert smollm_tokenizer.convert_ids_to_tokens(compiler.eos_token) == "<|im_end|>" and compiler.eos_token == 2


# ---------------------------------------------------------------- the masks against llguidance


def reference_allowed(compiler: GrammarCompiler, spec: GrammarSpec, prefix: list[int], vocab: int) -> set[int]:
    """The tokens llguidance allows after ``prefix``, from its own bytes (``compute_bitmask``), checked
    against ``validate_tokens`` on every allowed token and a sample of the others."""
    matcher = llguidance.LLMatcher(compiler.tokenizer, grammar_text(spec), log_level=0)
    assert matcher.consume_tokens(prefix)
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = {int(t) for t in np.nonzero(bits)[0] if t < vocab}
    others = [t for t in range(0, min(vocab, compiler.tokenizer.vocab_size), 97) if t not in allowed]
    assert all(matcher.validate_tokens([t]) == 1 for t in allowed if t != compiler.eos_token)
    assert all(matcher.validate_tokens([t]) == 0 for t in others)
    return allowed


CASES = [  # (spec, text already generated)
    (VALID[1], '{"colour":"'),
    (VALID[1], '{"colour":"green","n":4'),
    (VALID[0], '{"note":"some words'),  # inside a string: most tokens are allowed
    (VALID[2], "12"),
    (VALID[3], ""),
    (VALID[3], "yes"),  # finished: EOS only
]


@pytest.mark.parametrize("vocab_delta", [PADDING, -10], ids=["padded-output", "narrow-output"])
def test_the_masks_allow_exactly_what_llguidance_allows(compiler, smollm_tokenizer, vocab_delta):
    vocab = len(smollm_tokenizer) + vocab_delta
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(len(CASES) + 2, vocab, generator=generator) * 3, dim=-1)
    original = logprobs.clone()
    rows = [5, 0, 7, 2, 3, 6]  # rows 1 and 4 are unconstrained
    matchers = []
    for spec, text in CASES:
        matcher = compiler.matcher(spec)
        assert all(matcher.accept(t) for t in ids(smollm_tokenizer, text))
        matchers.append(matcher)
    apply_grammar_masks(logprobs, rows, matchers)
    for row in (1, 4):
        assert torch.equal(logprobs[row], original[row])
    for row, (spec, text) in zip(rows, CASES, strict=True):
        allowed = reference_allowed(compiler, spec, ids(smollm_tokenizer, text), vocab)
        finite = set(torch.nonzero(torch.isfinite(logprobs[row])).flatten().tolist())
        assert finite == allowed, (spec.kind, text)
        assert not any(t >= len(smollm_tokenizer) for t in finite)  # padding ids never allowed
        keep = torch.tensor(sorted(allowed))
        renormalised = original[row, keep] - torch.logsumexp(original[row, keep], dim=0)
        torch.testing.assert_close(logprobs[row, keep], renormalised)
    assert set(torch.nonzero(torch.isfinite(logprobs[6])).flatten().tolist()) == {2}  # "yes" done: EOS only
    assert len(set(torch.nonzero(torch.isfinite(logprobs[7])).flatten().tolist())) > 10_000


def test_masking_every_row_at_once_equals_masking_some(compiler, smollm_tokenizer):
    vocab = len(smollm_tokenizer) + PADDING
    logprobs = torch.log_softmax(torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)), dim=-1)
    some = logprobs.clone()
    specs = [VALID[0], VALID[2], VALID[4]]
    apply_grammar_masks(logprobs, [0, 1, 2], [compiler.matcher(s) for s in specs])
    for row, spec in enumerate(specs):
        apply_grammar_masks(some, [row], [compiler.matcher(spec)])
    assert torch.equal(torch.isfinite(logprobs), torch.isfinite(some))
    torch.testing.assert_close(logprobs[torch.isfinite(logprobs)], some[torch.isfinite(some)])


def test_plausibility_counts_from_the_most_likely_allowed_token(compiler, smollm_tokenizer):
    """amulet's plausibility mask keeps tokens at least beta times as likely as the top one; with a
    grammar, the top allowed one, else a grammar that bans the model's favourite would leave nothing."""
    vocab = len(smollm_tokenizer) + PADDING
    spec = VALID[3]  # "yes", "no", 'say "café"'
    allowed = torch.tensor(sorted(reference_allowed(compiler, spec, [], vocab)))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2))
    logits[0, 1000] = 30.0  # the pref context's favourite, which the grammar bans
    logits[0, allowed] = torch.linspace(5.0, 9.0, len(allowed))
    method = MethodSettings(method=Method.AMULET, plausibility=0.5)
    specs = [RowSpec(0, 1, method, 2.0)]
    masks = grammar_masks([0], [compiler.matcher(spec)], vocab)
    without = method_logprobs(logits, specs)
    masks.apply_(without)
    assert torch.isnan(without).all()  # the plain plausibility mask left no allowed token
    out = method_logprobs(logits, specs, masks)
    l0 = torch.log_softmax(logits[0], dim=-1)
    expected = {int(t) for t in allowed if l0[t] >= l0[allowed].max() + math.log(0.5)}
    assert set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist()) == expected and expected
    assert math.isclose(float(out[0].exp().sum()), 1.0, rel_tol=1e-5)


def test_a_model_wider_than_the_compiler_bans_the_extra_ids(smollm_tokenizer):
    narrow = GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer) - 100)  # covers the tokenizer's ids only
    vocab = len(smollm_tokenizer) + PADDING
    logprobs = torch.zeros(1, vocab)
    apply_grammar_masks(logprobs, [0], [narrow.matcher(GrammarSpec(GrammarKind.LARK, "start: /(?s:.*)/"))])
    finite = torch.isfinite(logprobs[0])
    assert finite[: len(smollm_tokenizer)].sum() > 40_000 and not finite[len(smollm_tokenizer) :].any()


def test_method_logprobs_masks_each_row_once_whatever_the_layout(compiler, smollm_tokenizer):
    """Single- and two-context rows, plausibility on and off, some rows constrained: each row against a
    straightforward reference (mask, plausibility from the top allowed token, one renormalisation)."""
    vocab = len(smollm_tokenizer) + PADDING
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * 4
    on, off = MethodSettings(method=Method.AMULET, plausibility=0.3), MethodSettings(method=Method.LA, plausibility=0.0)
    base = MethodSettings(method=Method.BASE)
    specs = [RowSpec(0, None, base, None), RowSpec(1, 2, on, 3.0), RowSpec(3, 4, off, 2.0), RowSpec(5, None, base, None)]
    constrained = {0: VALID[0], 1: VALID[3], 2: VALID[2]}  # row 3 is free
    masks = grammar_masks(list(constrained), [compiler.matcher(s) for s in constrained.values()], vocab)
    out = method_logprobs(logits, specs, masks)
    for i, spec in enumerate(specs):
        if spec.contrast is None:
            expected = torch.log_softmax(logits[spec.primary_row], dim=-1)
        else:
            coefficient = torch.tensor([[spec.coefficient]])
            expected = combine_contexts_float32(logits[[spec.primary_row]], logits[[spec.contrast]], coefficient)[0]
        keep = torch.ones(vocab, dtype=torch.bool)
        if i in constrained:
            keep[:] = False
            keep[sorted(reference_allowed(compiler, constrained[i], [], vocab))] = True
        if spec.contrast is not None and spec.method.plausibility > 0:
            l0 = torch.log_softmax(logits[spec.primary_row], dim=-1)
            keep &= l0 >= l0[keep].max() + math.log(spec.method.plausibility)
        expected = torch.log_softmax(expected.masked_fill(~keep, float("-inf")), dim=-1)
        assert torch.equal(torch.isfinite(out[i]), keep), i
        torch.testing.assert_close(out[i][keep], expected[keep], rtol=1e-5, atol=1e-5)
    twos = [RowSpec(0, 1, on, 3.0), RowSpec(2, 3, off, 2.0)]  # the engine's layout when every request has two contexts
    pair_masks = grammar_masks([1], [compiler.matcher(VALID[2])], vocab)
    paired = method_logprobs(logits[1:5], twos, pair_masks)
    torch.testing.assert_close(paired[1], out[2], equal_nan=True)
    assert torch.equal(torch.isfinite(paired[0]), torch.isfinite(method_logprobs(logits[1:5], twos)[0]))
