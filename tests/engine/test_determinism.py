"""Greedy answers are reproducible (issue 27, item 7): the same request with temperature 0 gets the same tokens and
the same logits, to the bit, cold, on a prefix-cache hit (the same request again, or one sharing a long prefix),
and inside a busy batch (other requests of other lengths decoding beside it, its prompt prefilled in chunks, a
late prompt prefilled in the same steps, two choices of it), for ``base`` and ``amulet`` (whose contexts share
their leading blocks), in float32 and bfloat16, with the engine's defaults.

The logits of every step are compared with ``torch.equal``, not only the tokens: on tiny random models tokens
can agree by luck, a bit cannot. With ``EngineConfig(deterministic=False)`` (SDPA and MKL, the forward before
issue 27) the engine tests here fail on the CPU in float32 (a prefix-cache hit leaves the last prompt token a
one-row product, a busy batch makes a decode row one of many) and the busy batches in bfloat16 too.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from amulet_core.engine import invariant_ops
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.invariant_attention import (
    KEY_BLOCK,
    InvariantPlan,
    InvariantSpan,
    decode_plan,
    invariant_attention,
)
from amulet_core.engine.invariant_ops import (
    ONEDNN_LINEAR_DTYPES,
    PackedWeights,
    batch_invariant,
    install,
    invariant_linear,
)
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.parallel_sampling import choice_request
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.method.preference_prompts import TEMPLATE, Placement, preference_contexts, resolve_default_system_prompt
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat, template_default_system_prompt
from amulet_core.model.loading import LoadedModel
from amulet_core.model.q8_output import q8_output_layer
from amulet_core.model.quantization import quantize_model
from amulet_core.sampling.params import SamplingParams
from tests.support.step_spy import spy_passes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = [Method.BASE, Method.AMULET]
OBSERVED = "Name a fruit and its colour."

QUESTION = (
    "I am planning a small vegetable garden on a balcony that gets about five hours of sun in the afternoon. "
    "The pots are plastic, thirty centimetres deep, and the wind can be strong in spring. Which vegetables "
    "would you grow first, how often should I water them in July, and what should I do about the wind?"
)


# ---------------------------------------------------------------- helpers


def engine_for(loaded: LoadedModel, **config) -> LLMEngine:
    """An engine with the defaults (on a GPU test device, with ``deterministic`` asked for: off by default there)."""
    settings = dict(max_model_len=1024, kv_cache_tokens=16384) | config
    if loaded.device.type != "cpu":
        settings.setdefault("deterministic", True)
    return LLMEngine(loaded, EngineConfig(**settings))


def contexts(tokenizer, method: Method, question: str = QUESTION, preference: str = "concise") -> list[tuple[int, ...]]:
    """The request's contexts as the server builds them by default: the chat template's system prompt, the
    preference at the end of the last user message."""
    system = resolve_default_system_prompt(TEMPLATE, template_default_system_prompt(tokenizer))
    built = preference_contexts([{"role": "user", "content": question}], [preference], system, placement=Placement.END)
    return [tuple(render_chat(tokenizer, m)) for m in built.decoded_by(method)]


def one_token_tail(tokenizer, method: Method) -> str:
    """QUESTION lengthened until the first context's last block holds one token: a prefix-cache hit then leaves
    that token alone to prefill, a one-row step (the observed prompt's case)."""
    question = QUESTION
    for _ in range(64):
        if (len(contexts(tokenizer, method, question)[0]) - 1) % 16 == 0:
            return question
        question += " Thanks"
    raise AssertionError("no lengthening of the question ends a block with one token")


def greedy(rid: str, ctxs: list[tuple[int, ...]], method: Method, max_tokens: int = 12) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return GenerationRequest.from_contexts(rid, ctxs, params, MethodSettings(method=method))


def random_request(rid: str, seed: int, length: int, method: Method, max_tokens: int) -> GenerationRequest:
    rng = random.Random(seed)
    head = [rng.randrange(10, 5000) for _ in range(length)]
    ctxs = [tuple(head + [rng.randrange(10, 5000) for _ in range(7)]), tuple(head + [rng.randrange(10, 5000)])]
    return greedy(rid, ctxs if method is Method.AMULET else ctxs[1:], method, max_tokens)


@dataclass
class Answer:
    tokens: list[int]
    logits: torch.Tensor
    """Every step's logits rows of the request's sequences, stacked in step order."""
    cached_tokens: int


class Recorder:
    """Wraps the engine's runner: keeps, per request id, the logits rows of its sequences at every step (a contrast row
    the step left undone, computed whole: the output layer of the hidden state the method read)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[str, list[GenerationOutput]] = defaultdict(list)
        self.engine = engine

        def recording(chunks, logits_for, logits):
            owner = {id(seq): rid for rid, state in engine.requests.items() for seq in state.group.seqs}
            for i, seq in enumerate(logits_for):
                self.rows[owner[id(seq)]].append(logits[i].detach().cpu().clone())

        spy_passes(engine, recording)  # contrast rows left undone: recorded whole, from the hidden states

    def step(self) -> None:
        for out in self.engine.step():
            self.outputs[out.request_id].append(out)

    def drain(self) -> None:
        for _ in range(10_000):
            if not self.engine.has_work():
                return
            self.step()
        raise AssertionError("the engine did not finish")

    def answer(self, rid: str) -> Answer:
        outs = self.outputs[rid]
        assert outs and outs[-1].finished and outs[-1].finish_reason in ("stop", "length"), outs[-1:]
        tokens = [t for o in outs for t in o.token_ids]
        usage = outs[-1].usage
        assert usage is not None
        return Answer(tokens, torch.stack(self.rows[rid]), usage.cached_prompt_tokens)


def alone(loaded: LoadedModel, request: GenerationRequest, **config) -> Answer:
    """The request on a fresh engine, nothing else running: the cold answer."""
    recorder = Recorder(engine_for(loaded, **config))
    recorder.engine.add_request(request)
    recorder.drain()
    return recorder.answer(request.request_id)


def assert_same(answer: Answer, cold: Answer) -> None:
    assert answer.tokens == cold.tokens
    assert answer.logits.shape == cold.logits.shape
    differing = (answer.logits != cold.logits).any(dim=-1).nonzero().flatten().tolist()
    assert not differing, f"logits rows {differing} differ (max {float((answer.logits - cold.logits).abs().max()):.3g})"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_in(tiny_model):
    """The tiny random Llama in a dtype (a copy of the same weights)."""
    built: dict[str, LoadedModel] = {}

    def get(dtype: str) -> LoadedModel:
        if dtype not in built:
            base = tiny_model("llama")
            model = base.model if base.dtype == DTYPES[dtype] else copy.deepcopy(base.model).to(DTYPES[dtype])
            built[dtype] = LoadedModel(model, base.tokenizer, base.name, base.device, DTYPES[dtype], base.eos_token_ids)
        return built[dtype]

    return get


@pytest.fixture(scope="module")
def cold_answer(model_in):
    """The cold answer of the request (``method``, ``dtype``, the question), computed once per module."""
    answers: dict[tuple[Method, str, str], Answer] = {}

    def get(method: Method, dtype: str, question: str = QUESTION) -> Answer:
        if (method, dtype, question) not in answers:
            loaded = model_in(dtype)
            request = greedy("cold", contexts(loaded.tokenizer, method, question), method)
            answers[method, dtype, question] = alone(loaded, request)
        return answers[method, dtype, question]

    return get


parametrized = pytest.mark.parametrize(
    ("method", "dtype"), [(m, d) for m in METHODS for d in DTYPES], ids=lambda v: getattr(v, "value", v)
)


# ---------------------------------------------------------------- the engine, tiny models


@parametrized
def test_the_same_request_again_hits_the_prefix_cache_and_answers_identically(model_in, cold_answer, method, dtype):
    loaded = model_in(dtype)
    recorder = Recorder(engine_for(loaded))
    question = one_token_tail(loaded.tokenizer, method)
    ctxs = contexts(loaded.tokenizer, method, question)
    for rid in ("first", "again", "third"):
        recorder.engine.add_request(greedy(rid, ctxs, method))
        recorder.drain()
    cold = cold_answer(method, dtype, question)
    assert_same(recorder.answer("first"), cold)
    for rid in ("again", "third"):
        answer = recorder.answer(rid)
        assert answer.cached_tokens >= 16 * ((len(ctxs[0]) - 1) // 16)  # every full block of the prompt
        assert_same(answer, cold)


@parametrized
def test_a_request_after_another_sharing_its_long_prefix_answers_as_cold(model_in, cold_answer, method, dtype):
    loaded = model_in(dtype)
    recorder = Recorder(engine_for(loaded))
    other = contexts(loaded.tokenizer, method, QUESTION.replace("about the wind?", "about slugs and snails?"))
    recorder.engine.add_request(greedy("other", other, method, max_tokens=5))
    recorder.drain()
    recorder.engine.add_request(greedy("mine", contexts(loaded.tokenizer, method), method))
    recorder.drain()
    answer = recorder.answer("mine")
    assert answer.cached_tokens >= 64  # the conversation before "the wind" came from the other request's blocks
    assert_same(answer, cold_answer(method, dtype))


@parametrized
def test_a_request_in_a_busy_batch_answers_as_cold(model_in, cold_answer, method, dtype):
    """Four requests of 7 to 260 tokens decode; the request joins at step 3, its prompt prefilled in chunks of a
    64-token budget beside their decode rows; a 300-token prompt arrives at step 6 and prefills beside its
    decoding; a second choice of it (``n = 2``) joins once the first has its first token."""
    loaded = model_in(dtype)
    recorder = Recorder(engine_for(loaded, max_num_batched_tokens=64))
    engine = recorder.engine
    for i, (length, m) in enumerate([(7, Method.BASE), (45, Method.AMULET), (130, Method.BASE), (260, Method.AMULET)]):
        engine.add_request(random_request(f"busy-{i}", i, length, m, max_tokens=60))
    request = greedy("mine", contexts(loaded.tokenizer, method), method)
    first, second = choice_request(request, 0, 2), choice_request(request, 1, 2)
    for step in range(10_000):
        if step == 3:
            engine.add_request(first)
        if step == 6:
            engine.add_request(random_request("late", 9, 300, Method.AMULET, max_tokens=20))
        started = second.request_id in engine.requests or recorder.outputs[second.request_id]
        if recorder.outputs[first.request_id] and not started:  # as n = 2 does: once the first choice has a token
            engine.add_request(second)
        if not engine.has_work():
            break
        recorder.step()
    cold = cold_answer(method, dtype)
    assert_same(recorder.answer(first.request_id), cold)
    assert_same(recorder.answer(second.request_id), cold)
    assert recorder.answer(second.request_id).cached_tokens > 0


def beside_busy_requests(loaded: LoadedModel, request: GenerationRequest, busy: Method) -> Recorder:
    """``request`` sent one step after three requests of ``busy`` (9, 70 and 150 prompt tokens, 30 new each), on
    an engine that prefills 48 tokens a step (its prompt chunked among theirs); everything run to its end."""
    recorder = Recorder(engine_for(loaded, max_num_batched_tokens=48))
    for i, length in enumerate((9, 70, 150)):
        recorder.engine.add_request(random_request(f"busy-{i}", i, length, busy, max_tokens=30))
    recorder.step()
    recorder.engine.add_request(request)
    recorder.drain()
    return recorder


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_answer_as_cold_in_a_busy_batch(tiny_model, family):
    """Qwen2 (biased projections) and Mistral: the same bits alone and beside other requests, prompt chunked."""
    loaded = tiny_model(family)
    request = greedy("mine", contexts(loaded.tokenizer, Method.AMULET), Method.AMULET)
    cold = alone(loaded, request)
    assert_same(beside_busy_requests(loaded, request, Method.BASE).answer("mine"), cold)


def test_padded_decode_steps_give_the_same_bits(model_in):
    """The decode graphs' padded steps (CUDA graphs' shapes, run eagerly here): with the deterministic forward,
    padding rows and contexts change no bit of the real rows' logits."""
    loaded = model_in("float32")
    recorder = Recorder(engine_for(loaded, max_num_seqs=8))
    engine = recorder.engine
    for i, length in enumerate((5, 40, 130)):
        engine.add_request(random_request(f"r{i}", i, length, Method.BASE, max_tokens=2))
    while len(recorder.outputs) < 3:  # prefilled: each has its first token, its second to decode
        recorder.step()
    running = [state.group.seqs[0] for state in engine.requests.values()]
    chunks = [ScheduledChunk(seq, len(seq) - 1, 1) for seq in running]
    for seq in running:
        engine.blocks.ensure_capacity(seq, len(seq))
    eager = engine.runner.run(chunks, running).clone()
    engine.runner.use_decode_graphs(capture=loaded.device.type == "cuda")
    padded = engine.runner.run(chunks, running)
    assert engine.runner.graphs is not None and engine.runner.graphs.steps == 1
    assert torch.equal(padded, eager)


def test_the_check_catches_a_batch_dependent_forward(model_in):
    """The comparison has teeth: without the deterministic forward, float32 logits on the CPU differ between a
    request decoded alone and beside others (MKL multiplies one row with another order than several)."""
    loaded = model_in("float32")
    if loaded.device.type != "cpu" or not torch.backends.mkl.is_available():
        pytest.skip("measured with MKL on the CPU")
    request = greedy("mine", contexts(loaded.tokenizer, Method.BASE), Method.BASE)
    cold = alone(loaded, request, deterministic=False)
    recorder = Recorder(engine_for(loaded, deterministic=False))
    for i, length in enumerate((7, 45, 130)):
        recorder.engine.add_request(random_request(f"busy-{i}", i, length, Method.BASE, max_tokens=40))
    recorder.engine.add_request(request)
    recorder.drain()
    assert not torch.equal(recorder.answer("mine").logits, cold.logits)


# ---------------------------------------------------------------- the parts


def test_deterministic_is_on_by_default_on_the_cpu_only():
    assert EngineConfig().deterministic_on("cpu")
    assert not EngineConfig().deterministic_on("cuda")
    assert EngineConfig(deterministic=True).deterministic_on("cuda")
    assert not EngineConfig(deterministic=False).deterministic_on("cpu")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_linear_row_has_the_same_bits_among_any_rows(dtype):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 80).to(DTYPES[dtype]), torch.randn(96).to(DTYPES[dtype])
    row = torch.randn(80).to(DTYPES[dtype])
    alone_row = invariant_linear(row.view(1, 1, 80), weight, bias)[0, 0]
    for count in (2, 3, 4, 7, 16, 65, 300):
        rows = torch.randn(count, 80).to(DTYPES[dtype])
        at = count // 2
        rows[at] = row
        assert torch.equal(invariant_linear(rows, weight, bias)[at], alone_row), count
    reference = F.linear(row.double(), weight.double(), bias.double())
    torch.testing.assert_close(alone_row.double(), reference, atol=0.05, rtol=0.02)


def test_activations_have_the_same_bits_wherever_a_value_falls():
    torch.manual_seed(0)
    x = torch.randn(4099) * 4
    layers = torch.nn.ModuleList([torch.nn.SiLU(), torch.nn.GELU(), torch.nn.GELU(approximate="tanh")])
    assert install(layers) == 3
    outside = [layer(x) for layer in layers]
    with batch_invariant():
        whole = [layer(x) for layer in layers]
        for start in (0, 1, 17, 4000):
            for layer, full in zip(layers, whole, strict=True):
                assert torch.equal(full[start : start + 37], layer(x[start : start + 37]))
    for inside, own in zip(whole, outside, strict=True):
        torch.testing.assert_close(inside, own)
    assert torch.equal(outside[0], F.silu(x))  # outside the block the modules compute as their own


def test_an_installed_model_computes_as_before_outside_the_block_and_in_a_copy(model_in):
    loaded = model_in("float32")
    ids = torch.tensor([[5, 80, 900, 3, 17]], device=loaded.device)
    before = loaded.model(input_ids=ids).logits
    install(loaded.model)
    assert torch.equal(loaded.model(input_ids=ids).logits, before)
    copy_bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    with batch_invariant():
        inside = loaded.model(input_ids=ids).logits
        from_copy = copy_bf16(input_ids=ids).logits  # the copy's layers use its own (bfloat16) weights
    torch.testing.assert_close(inside, before, atol=1e-4, rtol=1e-4)
    assert from_copy.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_packed_weights_keep_a_rows_bits_among_any_rows_and_compute_the_plain_product(model_in, dtype):
    """Packed weights are batch-invariant themselves; their bits equal the plain weights' on AVX512 CPUs only
    (on AVX2 oneDNN multiplies a reordered weight with another kernel), so against the plain product: close."""
    loaded = model_in(dtype)
    if loaded.device.type != "cpu":
        pytest.skip("weights are packed for oneDNN on the CPU only")
    install(loaded.model)
    packed = PackedWeights(loaded.model)
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    # bfloat16 only where oneDNN has its product (AVX512 or AVX-NE-CONVERT); elsewhere none is packed, none fails
    assert len(packed) == (len(linears) if loaded.dtype in ONEDNN_LINEAR_DTYPES else 0)
    torch.manual_seed(0)
    for layer in linears:
        weight = packed.weight(layer)
        row = F.rms_norm(torch.randn(layer.in_features), (layer.in_features,)).to(loaded.dtype)
        alone_row = invariant_linear(row.view(1, 1, -1), weight, layer.bias)[0, 0]
        for count in (2, 3, 7, 65):
            rows = torch.randn(count, layer.in_features).to(loaded.dtype)
            rows[count // 2] = row
            assert torch.equal(invariant_linear(rows, weight, layer.bias)[count // 2], alone_row), (layer, count)
    for rows in ([[5]], [[5, 80, 900, 3, 17, 44, 6]]):  # one row (computed beside a copy of itself), several
        ids = torch.tensor(rows)
        with batch_invariant(packed):
            fast = loaded.model(input_ids=ids).logits
        with batch_invariant():
            plain = loaded.model(input_ids=ids).logits
        torch.testing.assert_close(fast, plain, atol=1e-4 if dtype == "float32" else 0.05, rtol=1e-4)


def test_without_onednns_bfloat16_product_nothing_is_packed_and_linear_layers_run_tiled(model_in, monkeypatch):
    """A CPU whose oneDNN has no bfloat16 product (AVX2 only, where packing a bfloat16 weight raised and the server
    exited at start-up), forced on any CPU: no weight is packed and no bfloat16 product reaches oneDNN."""
    loaded = model_in("bfloat16")
    if loaded.device.type != "cpu":
        pytest.skip("oneDNN runs on the CPU only")
    monkeypatch.setattr(invariant_ops, "ONEDNN_LINEAR_DTYPES", (torch.float32,))

    def refused(*args, **kwargs):
        raise RuntimeError("oneDNN has no bfloat16 product on this CPU")

    monkeypatch.setattr(invariant_ops, "_LINEAR", refused)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refused)
    weights = invariant_ops.invariant_weights(loaded.model, available_ram=1 << 40)
    assert len(weights) == 0
    ids = torch.tensor([[5, 80, 900, 3, 17, 44, 6]])
    with batch_invariant(weights):
        tiled = loaded.model(input_ids=ids).logits
    plain = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(tiled, plain, atol=0.05, rtol=0.02)


def _attention_case(dtype: torch.dtype, dim: int, group: int, window: int | None, kernel=None):
    """Attention of every position of a 300-token context computed cold (one chunk), in a later chunk, after a
    cache hit (a short last chunk), and as decode rows among others; all must agree bitwise. ``kernel``: through
    the fixed-order kernel, else the torch operations."""
    torch.manual_seed(0)
    kv, length, slots_total = 2, 300, 2048
    k_cache = torch.randn(kv, slots_total, dim).to(dtype)
    v_cache = torch.randn(kv, slots_total, dim).to(dtype)
    context = torch.randperm(slots_total)[:length]
    queries = torch.randn(1, kv * group, length, dim).to(dtype)

    def chunk(start: int, end: int) -> torch.Tensor:
        plan = InvariantPlan(None, (InvariantSpan.of(0, end - start, context[:end]),), kernel)
        return invariant_attention(queries[:, :, start:end], k_cache, v_cache, plan, dim**-0.5, window)[0]

    def decode(position: int, others: list[int]) -> torch.Tensor:
        lengths = [*others, position + 1]
        longest = max(lengths)
        width = -(-longest // KEY_BLOCK) * KEY_BLOCK  # tables of one-slot blocks
        own = torch.cat([context, torch.zeros(max(0, width - length), dtype=torch.long)])[:width]
        tables = torch.stack([torch.randperm(slots_total)[:width] for _ in others] + [own])
        rows = torch.randn(1, kv * group, len(lengths), dim).to(dtype)
        rows[:, :, -1] = queries[:, :, position]
        plan = InvariantPlan(decode_plan(tables, torch.tensor(lengths), 1, longest), (), kernel)
        return invariant_attention(rows, k_cache, v_cache, plan, dim**-0.5, window)[0, -1]

    cold = chunk(0, length)
    assert torch.equal(chunk(100, 164), cold[100:164])  # a middle chunk
    assert torch.equal(chunk(length - 3, length), cold[-3:])  # a short tail after a cache hit
    assert torch.equal(chunk(length - 2, length), cold[-2:])  # fewer tokens than key blocks: as decode rows
    assert torch.equal(decode(length - 1, [5, 700, 64]), cold[-1])
    assert torch.equal(decode(length - 1, []), cold[-1])
    assert torch.equal(decode(63, [1, 130]), cold[63])
    return queries, k_cache[:, context], v_cache[:, context], cold


@pytest.mark.parametrize(
    ("dtype", "dim", "group", "window"),
    [(torch.float32, 64, 3, None), (torch.bfloat16, 64, 3, None), (torch.float32, 24, 1, None), (torch.float32, 16, 2, 70)],
)
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_attention_has_the_same_bits_however_a_token_is_scheduled(dtype, dim, group, window, path, fixed_order_kernel):
    kernel = fixed_order_kernel if path == "kernel" else None
    queries, keys, values, cold = _attention_case(dtype, dim, group, window, kernel)
    length = keys.shape[1]
    allowed = torch.ones(length, length).tril().bool()
    if window is not None:
        allowed &= ~torch.ones(length, length).tril(-window).bool()
    reference = F.scaled_dot_product_attention(
        queries.double(),
        keys.double().repeat_interleave(group, 0).unsqueeze(0),
        values.double().repeat_interleave(group, 0).unsqueeze(0),
        attn_mask=allowed,
        scale=dim**-0.5,
    )
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(cold.double(), reference[0].transpose(0, 1), atol=tolerance, rtol=tolerance)


# ---------------------------------------------------------------- the real model, the observed prompt


@pytest.fixture(scope="module")
def smollm_bf16(smollm) -> LoadedModel:
    """SmolLM2 in bfloat16, as the observation was made and as a server serves it by default (a copy of the
    session's float32 weights; ``--quantization auto``: its 4-bit layers multiplied as int4)."""
    model = copy.deepcopy(smollm.model).to(torch.bfloat16)
    assert quantize_model(model, "int4", exact_only=True).exact_layers == 7 * 30
    return LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, torch.bfloat16, smollm.eos_token_ids)


@pytest.fixture(scope="module")
def smollm_served_float32(smollm) -> LoadedModel:
    """SmolLM2 as ``make serve`` serves it on a CPU without native bfloat16: float32, its 4-bit layers on the
    compiled int4-q16 kernel, its Q8_0 output layer as 8-bit blocks."""
    model = copy.deepcopy(smollm.model)
    assert quantize_model(model, "int4-q16", exact_only=True).exact_layers == 7 * 30
    assert q8_output_layer(model) is not None
    return LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, torch.float32, smollm.eos_token_ids)


@pytest.mark.parametrize(("dtype", "threads"), [("float32", 1), ("bfloat16", 1), ("bfloat16", 2), ("float32-int4-q16", 2)])
def test_smollm_answers_the_observed_prompt_identically_cold_cached_and_busy(
    smollm, smollm_bf16, smollm_served_float32, dtype, threads
):
    """ "Name a fruit and its colour." with preference concise (amulet, the end placement): the same tokens and
    logits cold, again (prefix-cache hit) and beside other requests decoding; also with two torch threads (a 2-core
    server's default), whose products split the work between threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    loaded = {"bfloat16": smollm_bf16, "float32": smollm, "float32-int4-q16": smollm_served_float32}[dtype]
    try:
        answers_identically_cold_cached_and_busy(loaded)
    finally:
        torch.set_num_threads(before)


def answers_identically_cold_cached_and_busy(loaded: LoadedModel) -> None:
    ctxs = contexts(loaded.tokenizer, Method.AMULET, OBSERVED)
    assert [len(c) for c in ctxs] == [49, 37]  # a prefix-cache hit leaves one token of the first context
    cold = alone(loaded, greedy("cold", ctxs, Method.AMULET, max_tokens=16))
    recorder = Recorder(engine_for(loaded))
    engine = recorder.engine
    engine.add_request(greedy("first", ctxs, Method.AMULET, max_tokens=16))
    recorder.drain()
    for i, length in enumerate((20, 90)):
        engine.add_request(random_request(f"busy-{i}", i, length, Method.AMULET, max_tokens=24))
    for step in range(10_000):
        if step == 2:
            engine.add_request(greedy("again", ctxs, Method.AMULET, max_tokens=16))
        if not engine.has_work():
            break
        recorder.step()
    assert loaded.tokenizer.decode(cold.tokens).strip()
    assert_same(recorder.answer("first"), cold)
    again = recorder.answer("again")
    assert again.cached_tokens > 0
    assert_same(again, cold)
