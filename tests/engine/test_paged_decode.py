"""The paged attention kernels (Triton kernels reading the KV blocks through the block tables) against the references.

On the CPU Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, set by tests/conftest.py) with float32
products; on a CUDA test device (``benchmarks/gpu_check.sh``) the compiled kernels run, in the test dtype. Checked:
the decode kernel against a float64 attention written out position by position and against the engine's SDPA path
over the gathered context, the prefill kernel against causal attention written out (grouped-query heads, head
sizes that are not powers of two, contexts across partitions, shuffled block tables, a sliding window, Gemma 2's
soft cap); the engine's greedy answers with the kernels against the straightforward loop's; a sliding window past
its length in all three attention paths against transformers' eager forward; and which backend
``--attention-backend`` gives.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from amulet_core.engine import paged_decode
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.paged_attention import PackedBatch, PagedKVCache, decode_group, paged_attention_forward
from amulet_core.engine.paged_decode import (
    PARTITION,
    attention_backend,
    kernel_probe,
    paged_decode_attention,
    paged_prefill_attention,
)
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from tests.engine.device import tiny_device
from tests.engine.test_engine import METHODS, drain, expected, make_request, mixed_requests, prompts, tokens_of

BLOCK = 16
LENGTHS = (1, 37, PARTITION, PARTITION + 1, 2 * PARTITION + 55)
"""One position, part of a partition, exactly one, one past it, three partitions."""


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def random_cache(kv_heads: int, dim: int, blocks: int, dtype: torch.dtype, seed: int) -> PagedKVCache:
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, kv_heads, dim, blocks, BLOCK, dtype, tiny_device())
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=gen))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=gen))
    return cache


def shuffled_tables(rows: int, max_len: int, blocks: int, seed: int) -> torch.Tensor:
    """Each row's blocks drawn at random from the pool (rows share none), as long as the longest row needs."""
    gen = torch.Generator().manual_seed(seed)
    need = -(-max_len // BLOCK)
    pool = torch.randperm(blocks, generator=gen)
    return pool[: rows * need].view(rows, need).to(tiny_device())


def written_out(
    query: torch.Tensor,
    cache: PagedKVCache,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """The attention, position by position, in float64."""
    rows, heads, _ = query.shape
    keys, values = cache.keys[0].double(), cache.values[0].double()
    group = heads // keys.shape[0]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for row in range(rows):
        length = int(lengths[row])
        positions = torch.arange(length)
        slots = tables[row].cpu()[positions // BLOCK] * BLOCK + positions % BLOCK
        for head in range(heads):
            k, v = keys[head // group, slots.to(keys.device)].cpu(), values[head // group, slots.to(keys.device)].cpu()
            scores = k @ query[row, head].double().cpu() * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if window is not None:
                scores = scores.masked_fill(positions < length - window, float("-inf"))
            out[row, head] = torch.softmax(scores, dim=0) @ v
    return out


CASES = [
    pytest.param(4, 4, 16, None, None, id="mha-d16"),
    pytest.param(9, 3, 64, None, None, id="gqa3-d64"),
    pytest.param(8, 2, 96, None, None, id="gqa4-d96"),
    pytest.param(8, 2, 32, 100, None, id="window100"),
    pytest.param(4, 2, 32, None, 5.0, id="softcap5"),
]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "softcap"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_kernel_equals_attention_written_out(heads, kv_heads, dim, window, softcap, dtype):
    rows, blocks = len(LENGTHS), 3 * 64
    max_len = max(LENGTHS)
    cache = random_cache(kv_heads, dim, blocks, dtype, seed=heads * dim)
    tables = shuffled_tables(rows, max_len, blocks, seed=dim)
    lengths = torch.tensor(LENGTHS, device=tiny_device())
    query = torch.randn(rows, heads, dim, generator=torch.Generator().manual_seed(5)).to(tiny_device(), dtype)
    if softcap is not None:
        query = query * 4  # scores the cap changes
    scale = dim**-0.5
    got = paged_decode_attention(query, cache.keys[0], cache.values[0], tables, lengths, BLOCK, max_len, scale, window, softcap)
    assert got.dtype == dtype and got.shape == query.shape
    want = written_out(query, cache, tables, lengths, scale, window, softcap)
    torch.testing.assert_close(got.double().cpu(), want, **tolerance(dtype))


def sharing_tables(blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tables, lengths, followers, skip) of rows that share leading blocks, as a request's contexts share the
    conversation: a leader with two followers sharing 16 blocks (one partition), a leader and a follower sharing 2,
    a row alone, a leader and a follower sharing past two partitions; the rest of each table its own blocks."""
    gen = torch.Generator().manual_seed(seed)
    pool = iter(torch.randperm(blocks, generator=gen).tolist())
    shared_blocks = {1: 16, 2: 16, 4: 2, 7: 2 * PARTITION // BLOCK + 1}
    leader_of = {1: 0, 2: 0, 4: 3, 7: 6}
    lengths = [300, 290, 310, 37, 40, PARTITION + 1, 2 * PARTITION + 55, 2 * PARTITION + 40]
    width = -(-max(lengths) // BLOCK)
    rows: list[list[int]] = []
    for row, length in enumerate(lengths):
        shared = shared_blocks.get(row, 0)
        own = rows[leader_of[row]][:shared] if shared else []
        rows.append(own + [next(pool) for _ in range(-(-length // BLOCK) - shared)])
    tables = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    followers = torch.full((len(lengths), 3), -1)
    for row, leader in leader_of.items():
        taken = int((followers[leader] >= 0).sum())
        followers[leader, taken] = row
    skip = torch.tensor([shared_blocks.get(row, 0) * BLOCK for row in range(len(lengths))])
    return tuple(t.to(tiny_device()) for t in (tables, torch.tensor(lengths), followers, skip))  # type: ignore[return-value]


SHARED_CASES = [c for c in CASES if c.id in ("mha-d16", "gqa3-d64", "softcap5")]


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "softcap"), SHARED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_shared_prefixes_read_once_give_the_attention_written_out(heads, kv_heads, dim, window, softcap, dtype):
    """Rows whose leading blocks are a leader's (followers): the leader's programs attend them for their queries too,
    their own programs start after them, the partials are combined: the attention written out, for every row."""
    cache = random_cache(kv_heads, dim, 3 * 64, dtype, seed=heads * dim + 1)
    tables, lengths, followers, skip = sharing_tables(3 * 64, seed=dim)
    max_len = int(lengths.max())
    query = torch.randn(len(lengths), heads, dim, generator=torch.Generator().manual_seed(6)).to(tiny_device(), dtype)
    if softcap is not None:
        query = query * 4
    scale = dim**-0.5
    args = (query, cache.keys[0], cache.values[0], tables, lengths, BLOCK, max_len, scale, window, softcap)
    got = paged_decode_attention(*args, followers=followers, skip=skip)
    want = written_out(query, cache, tables, lengths, scale, window, softcap)
    torch.testing.assert_close(got.double().cpu(), want, **tolerance(dtype))
    alone = paged_decode_attention(*args)  # the same rows, each over its whole table
    torch.testing.assert_close(got.double().cpu(), alone.double().cpu(), **tolerance(dtype))


def prefill_written_out(query, cache, tables, starts, counts, contexts, scale, window, softcap) -> torch.Tensor:
    """Causal attention of each span's new tokens over its context, in float64, position by position."""
    keys, values = cache.keys[0].double().cpu(), cache.values[0].double().cpu()
    heads = query.shape[1]
    group = heads // keys.shape[0]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for span, (start, count, context) in enumerate(zip(starts.tolist(), counts.tolist(), contexts.tolist(), strict=True)):
        positions = torch.arange(context)
        slots = tables[span].cpu()[positions // BLOCK] * BLOCK + positions % BLOCK
        for i in range(count):
            at = context - count + i
            seen = positions <= at
            if window is not None:
                seen &= positions > at - window
            for head in range(heads):
                k, v = keys[head // group, slots], values[head // group, slots]
                scores = k @ query[start + i, head].double().cpu() * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[start + i, head] = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=0) @ v
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "softcap"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_prefill_kernel_equals_causal_attention_written_out(heads, kv_heads, dim, window, softcap, dtype):
    """Spans of one token, of a whole prompt, and chunks after cached context (one longer than a program's tile of
    tokens), packed together with shuffled block tables."""
    device = tiny_device()
    counts = torch.tensor([1, 70, 33, 5], device=device)
    contexts = torch.tensor([40, 70, 33 + 130, 5], device=device)
    starts = torch.cumsum(counts, 0) - counts
    blocks = 4 * 13
    cache = random_cache(kv_heads, dim, blocks, dtype, seed=heads + dim)
    tables = shuffled_tables(4, int(contexts.max()), blocks, seed=dim)
    gen = torch.Generator().manual_seed(6)
    query = torch.randn(int(counts.sum()), heads, dim, generator=gen).to(device, dtype)
    if softcap is not None:
        query = query * 4
    scale = dim**-0.5
    got = paged_prefill_attention(
        query, cache.keys[0], cache.values[0], tables, starts, counts, contexts, BLOCK, 70, scale, window, softcap
    )
    assert got.dtype == dtype and got.shape == query.shape
    want = prefill_written_out(query, cache, tables, starts, counts, contexts, scale, window, softcap)
    torch.testing.assert_close(got.double().cpu(), want, **tolerance(dtype))


@pytest.mark.parametrize("window", [None, 40], ids=["full", "window40"])
def test_the_kernel_group_equals_the_gathered_sdpa_group_in_the_attention_hook(window):
    """The engine's attention function with a decode group for the kernel and one gathered for SDPA: the same
    output, and the same new keys and values written to the cache. Rows of unequal lengths (the gathered group
    pads and masks them) and a padding row on the scratch block, as the CUDA graphs' buckets have."""
    heads, kv_heads, dim, blocks = 6, 2, 32, 128
    lengths_list = [3, 70, 300, 1]  # the last: a padding row of length 1 on the scratch block
    max_len = max(lengths_list)
    rows = len(lengths_list)
    tables = shuffled_tables(rows, max_len, blocks - 1, seed=11)
    scratch = blocks - 1
    tables[-1] = scratch
    lengths = torch.tensor(lengths_list, device=tiny_device())
    new_slots = torch.stack([tables[r, (n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for r, n in enumerate(lengths_list)])
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(1, heads, rows, dim, generator=gen).to(tiny_device())
    key = torch.randn(1, kv_heads, rows, dim, generator=gen).to(tiny_device())
    value = torch.randn(1, kv_heads, rows, dim, generator=gen).to(tiny_device())
    module = SimpleNamespace(layer_idx=0)
    results = []
    for kernel in (True, False):
        cache = random_cache(kv_heads, dim, blocks, torch.float32, seed=9)
        group = decode_group(tables, lengths, BLOCK, max_len, paged_kernel=kernel)
        assert (group.context_slots is None) is kernel
        batch = PackedBatch(cache, new_slots, (), group)
        out, _ = paged_attention_forward(
            module,  # type: ignore[arg-type]
            query, key, value, None, scaling=dim**-0.5, amulet_batch=batch, sliding_window=window,
        )  # fmt: skip
        results.append((out, cache.keys[0].clone(), cache.values[0].clone()))
    (kernel_out, kernel_k, kernel_v), (sdpa_out, sdpa_k, sdpa_v) = results
    assert kernel_out.shape == (1, rows, heads, dim)
    torch.testing.assert_close(kernel_out, sdpa_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(kernel_k, sdpa_k) and torch.equal(kernel_v, sdpa_v)


def test_shapes_that_do_not_fit_are_refused():
    cache = random_cache(2, 16, 8, torch.float32, seed=0)
    tables = torch.zeros(1, 4, dtype=torch.long)
    lengths = torch.tensor([3])
    with pytest.raises(ValueError, match="do not fit"):
        paged_decode_attention(torch.zeros(1, 3, 16), cache.keys[0], cache.values[0], tables, lengths, BLOCK, 64, 1.0)
    with pytest.raises(ValueError, match="describe the rows"):
        paged_decode_attention(torch.zeros(1, 4, 16), cache.keys[0], cache.values[0], tables, lengths, BLOCK, 65, 1.0)


def test_which_backend_a_device_gets(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_backend("sdpa", cuda) == "sdpa"
    assert attention_backend("auto", cuda) == "triton"  # Triton is installed here
    assert attention_backend("auto", cpu) == "sdpa"
    assert attention_backend("triton", cpu) == "triton"  # the interpreter runs it (the tests)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device; this one is cpu"):
        attention_backend("triton", cpu)
    monkeypatch.setattr(paged_decode, "triton_available", lambda: False)
    assert attention_backend("auto", cuda) == "sdpa"
    with pytest.raises(ValueError, match="Triton, which is not installed"):
        attention_backend("triton", cuda)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")  # type: ignore[arg-type]


def test_the_start_up_probe_passes_the_kernel_and_catches_a_wrong_one(monkeypatch):
    device = tiny_device()
    assert kernel_probe(device, torch.float32) is None
    assert kernel_probe(device, torch.bfloat16) is None
    right = paged_decode.paged_decode_attention
    monkeypatch.setattr(paged_decode, "paged_decode_attention", lambda *a, **k: right(*a, **k) * 1.01)
    assert "differs from SDPA" in (kernel_probe(device, torch.float32) or "")
    monkeypatch.setattr(paged_decode, "paged_decode_attention", lambda *a, **k: 1 / 0)
    assert kernel_probe(device, torch.float32) == "ZeroDivisionError: division by zero"


def test_auto_falls_back_to_sdpa_when_the_probe_fails_and_triton_does_not(tiny_model, monkeypatch, caplog):
    """``auto`` on a device where the kernel resolves (here made to, as on a GPU) but fails its probe serves with
    SDPA and says why; ``triton`` asked for explicitly is not second-guessed."""
    from amulet_core.engine import model_runner

    monkeypatch.setattr(model_runner, "attention_backend", lambda requested, device: "triton")
    monkeypatch.setattr(model_runner, "kernel_probe", lambda device, dtype: "differs from SDPA by 1")
    loaded = tiny_model("llama")
    fields = {"deterministic": False, "kv_cache_tokens": 512, "max_model_len": 128}
    with caplog.at_level("WARNING", logger=model_runner.__name__):
        auto = LLMEngine(loaded, EngineConfig(attention_backend="auto", **fields))
    assert not auto.runner.paged_kernel
    assert "failed its start-up check (differs from SDPA by 1)" in caplog.text
    assert LLMEngine(loaded, EngineConfig(attention_backend="triton", **fields)).runner.paged_kernel


def kernel_config(**fields) -> EngineConfig:
    return EngineConfig(deterministic=False, attention_backend="triton", **fields)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("settings", [METHODS[0], METHODS[3]], ids=["base", "amulet"])
def test_the_engine_with_the_kernel_matches_the_reference(tiny_model, family, settings):
    loaded = tiny_model(family)
    engine = LLMEngine(loaded, kernel_config(max_model_len=256, kv_cache_tokens=2048))
    assert engine.runner.paged_kernel
    pref, base = prompts(1, shared=20, pref_extra=9, base_extra=3)
    request = make_request("r", settings, pref, base, max_tokens=12)
    engine.add_request(request)
    assert tokens_of(drain(engine)["r"]) == expected(loaded, request)
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "padded"])
def test_a_requests_contexts_read_their_shared_conversation_once(tiny_model, monkeypatch, graphs):
    """``amulet`` requests whose contexts share the conversation's first blocks (and one whose share is a single
    block), beside a ``base`` one: with the kernel, each decode step's preference rows lead and their contrast
    rows follow, skipping the shared positions (read once, by the leader's programs), in the eager step and in the
    decode graphs' padded one; every answer is the reference's."""
    from amulet_core.engine import paged_attention

    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, kernel_config(max_model_len=256, kv_cache_tokens=4096))
    if graphs and engine.runner.graphs is None:
        engine.runner.use_decode_graphs(capture=False)
    calls: list[tuple[list[list[int]], list[int]]] = []
    kernel = paged_attention.paged_decode_attention

    def recorded(*args, **kwargs):
        followers, skip = args[-2:] if len(args) > 10 else (kwargs.get("followers"), kwargs.get("skip"))
        if followers is not None:
            calls.append((followers.tolist(), skip.tolist()))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(paged_attention, "paged_decode_attention", recorded)
    long_pref, long_base = prompts(3, shared=40, pref_extra=9, base_extra=3)
    pref, base = prompts(4, shared=20, pref_extra=5, base_extra=2)
    requests = [
        make_request("long", METHODS[3], long_pref, long_base, max_tokens=10),
        make_request("base", METHODS[0], pref, base, max_tokens=10),
        make_request("short", METHODS[3], pref, base, max_tokens=10),
    ]
    for r in requests:
        engine.add_request(r)
    outputs = drain(engine)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r), r.request_id
    decode_steps = [(f, k) for f, k in calls if any(k)]
    assert decode_steps and (engine.runner.graphs is not None and engine.runner.graphs.steps > 0) == graphs
    followers, skip = decode_steps[-1]
    # rows: long's preference and contrast, base, short's preference and contrast (then padding, for the graphs)
    assert followers[0][:2] == [1, -1] and followers[3][:2] == [4, -1] and skip[:5] == [0, 32, 0, 0, 16]
    assert all(f == [-1] * len(f) for f in followers[1:3] + followers[4:])


def test_padded_decode_steps_with_the_kernel_need_one_context_bucket(tiny_model):
    """The CUDA graphs' padded steps (run eagerly here) with the kernel: one context bucket per batch size, the
    longest, and every answer of a mixed batch with late joiners the reference's."""
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, kernel_config(max_model_len=256, kv_cache_tokens=4096, max_num_batched_tokens=48, max_num_seqs=4))
    if engine.runner.graphs is None:
        engine.runner.use_decode_graphs(capture=False)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.context_lens == (256,)
    requests = mixed_requests()[:4]
    for r in requests[:2]:
        engine.add_request(r)

    def join(step: int) -> None:
        if step == 5:
            for r in requests[2:]:
                engine.add_request(r)

    outputs = drain(engine, on_step=join)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r), r.request_id
    assert graphs.steps > 0 and engine.blocks.num_used == 0


def test_a_deterministic_engine_refuses_the_kernel(tiny_model):
    with pytest.raises(ValueError, match="exclude each other"):
        LLMEngine(tiny_model("llama"), EngineConfig(deterministic=True, attention_backend="triton", kv_cache_tokens=512))


WINDOW = 24


@pytest.mark.parametrize("path", ["invariant", "sdpa", "triton"])
def test_decode_past_a_sliding_window_matches_transformers(tiny_model, path):
    """A Mistral whose window (24) the prompt and the answer pass: every decoded token's log-probabilities, at its
    prefix, those of transformers' eager forward over the whole sequence (which masks the keys outside the window),
    in each attention path."""
    shared = tiny_model("mistral")
    loaded = dataclasses.replace(shared, model=copy.deepcopy(shared.model))
    loaded.model.config.sliding_window = WINDOW
    reference = copy.deepcopy(loaded.model)
    reference.set_attn_implementation("eager")
    exact = loaded.dtype == torch.float32  # a GPU run in bfloat16 compares more loosely
    fields = {"max_model_len": 256, "kv_cache_tokens": 2048}
    config = kernel_config(**fields) if path == "triton" else EngineConfig(deterministic=path == "invariant", **fields)
    engine = LLMEngine(loaded, config)
    prompt, _ = prompts(3, shared=30, pref_extra=0, base_extra=0)
    sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    request = GenerationRequest("w", prompt, sampling, MethodSettings(method=Method.BASE))
    engine.add_request(request)
    ids = list(request.prompt_ids)
    entries = [e for out in drain(engine)["w"] for e in (out.logprobs or [])]
    assert len(entries) == 10
    for entry in entries:
        with torch.no_grad():
            logits = reference(torch.tensor([ids], device=loaded.device)).logits[0, -1].float()
        wanted = torch.log_softmax(logits, dim=-1).cpu()
        if exact:
            assert int(wanted.argmax()) == entry.token_id
        for token_id, _, logprob in entry.top:
            assert logprob == pytest.approx(float(wanted[token_id]), abs=2e-4 if exact else 0.1), token_id
        ids.append(entry.token_id)
    assert len(request.prompt_ids) > WINDOW  # every decode step attends past the window
