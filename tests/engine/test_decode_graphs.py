"""Decode steps padded to fixed-shape buckets (what CUDA graphs replay) give the engine's exact answers.

On the CPU the padded forward runs eagerly (``capture=False``); on a CUDA test device
(``benchmarks/gpu_check.sh``) the same tests capture and replay the graphs.
"""

from __future__ import annotations

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.graph_buckets import START_TAIL_VARIANTS, batch_buckets, context_buckets
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence
from amulet_core.method.reference import reference_generate
from tests.engine.test_engine import METHODS, drain, expected, make_request, mixed_requests, prompts, tokens_of


def padded_engine(loaded, config: EngineConfig) -> LLMEngine:
    engine = LLMEngine(loaded, config)
    if engine.runner.graphs is None:  # the CPU: the same padded forward, run eagerly
        engine.runner.use_decode_graphs(capture=False)
    return engine


def test_buckets_cover_every_batch_and_context_length():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert context_buckets(16, 2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert context_buckets(16, 100) == (16, 32, 64, 112)
    assert context_buckets(4, 64) == (4, 8, 16, 32, 64)


def test_start_up_capture_takes_the_smallest_buckets_first_and_writes_only_the_scratch_block(tiny_model):
    """``capture_at_start`` within a budget: the buckets with the fewest padded tokens first, none twice, and its
    padding rows write the scratch block only (the blocks sequences will own stay as they were). On the CPU, where
    CUDA graphs do not exist, a bucket's capture is its padded forward run eagerly."""
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=128, kv_cache_tokens=2048, max_num_seqs=8, graph_capture_seconds=0)
    runner = LLMEngine(loaded, config).runner
    cuda = runner.device.type == "cuda"
    runner.use_decode_graphs(capture=cuda)
    graphs = runner.graphs
    assert graphs is not None
    assert graphs.capture_at_start(100.0) == (len(graphs.graphs) if cuda else 0)  # no graphs without CUDA
    if not cuda:
        graphs.capture = True

        def eager_capture(bucket, tail=None):
            graphs._forward(*bucket, tail)
            if tail is None:
                graphs.graphs[bucket] = None
            else:
                graphs.tail_graphs[(bucket, tail)] = None

        graphs._capture = eager_capture  # type: ignore[method-assign]
    graphs.graphs.clear()
    graphs.captured_at_start = 0
    owned = runner.scratch_block * runner.block_size  # slots below the scratch block: what sequences get
    before = [k[:, :owned].clone() for k in runner.cache.keys]
    ticks = iter(range(1000))
    with torch.inference_mode():
        assert graphs.capture_at_start(5.0, clock=lambda: float(next(ticks))) == 4  # one tick a capture, 0 at start
    buckets = sorted(((b, n) for b in graphs.batch_sizes for n in graphs.context_lens), key=lambda x: (x[0] * x[1], x))
    assert list(graphs.graphs) == buckets[:4]
    assert all(torch.equal(k[:, :owned], b) for k, b in zip(runner.cache.keys, before, strict=True))
    variants = len(START_TAIL_VARIANTS)
    with torch.inference_mode():  # the rest, none twice; then the common variants of the tail, in the same order
        assert graphs.capture_at_start(1000.0, clock=lambda: 0.0) == len(buckets) * (1 + variants)
    assert list(graphs.graphs) == buckets
    assert list(graphs.tail_graphs) == [(bucket, tail) for tail in START_TAIL_VARIANTS for bucket in buckets]


def test_padded_logits_equal_the_unpadded_forward(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=128, kv_cache_tokens=2048, max_num_seqs=8))
    runner = engine.runner
    seqs = []
    for i, length in enumerate((5, 17, 33)):  # three rows padded to four, contexts padded to 64
        seqs.append(Sequence(list(prompts(60 + i, length, 1, 0)[0])))
    _prefill(engine, seqs)
    chunks = [ScheduledChunk(s, len(s) - 1, 1) for s in seqs]
    eager = runner.run(chunks, seqs)
    runner.use_decode_graphs(capture=runner.device.type == "cuda")
    assert runner.graphs is not None
    assert runner.graphs.bucket(3, 34) == (4, 64)
    padded = runner.run(chunks, list(reversed(seqs)))
    assert runner.graphs.steps == 1
    tolerance = 1e-4 if loaded.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(padded, eager.flip(0), atol=tolerance, rtol=tolerance)


def _prefill(engine: LLMEngine, seqs: list[Sequence]) -> None:
    """Give the sequences blocks of their own and compute the KV of all but their last token (eagerly)."""
    bs, next_block = engine.config.block_size, 0
    for seq in seqs:
        blocks = -(-len(seq) // bs)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
    chunks = [ScheduledChunk(s, 0, len(s) - 1) for s in seqs]
    engine.runner.run(chunks, seqs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("settings", METHODS, ids=lambda s: f"{s.method.value}-{s.iterations}")
def test_single_request_matches_reference(tiny_model, family, settings):
    loaded = tiny_model(family)
    engine = padded_engine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    pref, base = prompts(1, shared=20, pref_extra=9, base_extra=3)
    request = make_request("r", settings, pref, base, max_tokens=12)
    engine.add_request(request)
    assert tokens_of(drain(engine)["r"]) == expected(loaded, request)
    assert engine.runner.graphs is not None and engine.runner.graphs.steps >= 10
    assert engine.blocks.num_used == 0


def test_mixed_batch_with_late_joiners_and_padding_matches_reference(tiny_model):
    loaded = tiny_model("llama")
    engine = padded_engine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=4096, max_num_batched_tokens=48))
    requests = mixed_requests()
    for r in requests[:5]:
        engine.add_request(r)

    def join(step: int) -> None:
        if step in (6, 9):
            for r in requests[5:8] if step == 6 else requests[8:]:
                engine.add_request(r)

    outputs = drain(engine, on_step=join)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r), r.request_id
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.steps > 0
    assert engine.blocks.num_used == 0


def test_preemption_with_padded_decode_keeps_answers_exact(tiny_model):
    loaded = tiny_model("llama")
    engine = padded_engine(loaded, EngineConfig(max_model_len=64, kv_cache_tokens=128, block_size=4, max_num_seqs=8))
    requests = []
    for i in range(4):
        pref, base = prompts(40 + i, shared=12, pref_extra=4, base_extra=1)
        requests.append(make_request(f"p{i}", METHODS[3], pref, base, max_tokens=24, ignore_eos=True))
        engine.add_request(requests[-1])
    outputs = drain(engine)
    for r in requests:
        want = reference_generate(loaded.model, r.prompt_ids, r.contrast_prompt_ids, r.method, 24)
        assert tokens_of(outputs[r.request_id]) == want
    assert engine.blocks.num_used == 0
    assert engine.runner.scratch_block == engine.blocks.num_blocks  # never handed out


def test_a_failing_graph_falls_back_to_eager_steps_without_failing_requests(tiny_model):
    loaded = tiny_model("llama")
    engine = padded_engine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    graphs = engine.runner.graphs
    assert graphs is not None
    launches = 0
    launch = graphs.launch

    def failing_launch(bucket: tuple[int, int], tail=None) -> None:  # e.g. out of memory while capturing
        nonlocal launches
        launches += 1
        if launches == 3:
            raise torch.OutOfMemoryError("injected: no memory for the graph")
        launch(bucket, tail)

    graphs.launch = failing_launch  # type: ignore[method-assign]
    pref, base = prompts(2, shared=20, pref_extra=5, base_extra=2)
    request = make_request("r", METHODS[3], pref, base, max_tokens=10, ignore_eos=True)
    engine.add_request(request)
    outputs = drain(engine)["r"]
    assert tokens_of(outputs) == expected(loaded, request) and outputs[-1].finish_reason == "length"
    assert launches == 3 and engine.runner.graphs is None  # the rest of the steps ran eagerly
