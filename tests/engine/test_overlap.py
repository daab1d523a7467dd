"""The host overlapped with the device (``overlap_host``): a step's tokens read a step later give the same answers.

On the CPU the "device" is the same thread, so nothing runs in parallel, but every part of the pipeline runs as on a
GPU: sampling queued without reading the tokens, placeholders in the sequences, the next step's inputs filled from the
previous step's token tensor (eagerly and through the decode graphs' padded path), the tokens read and put in place a
step later, stops found a step late and the dropped rows' blocks freed. Each test compares with the synchronous
engine (the same requests, outputs field by field) or with the straightforward reference loop, and checks that steps
were overlapped at all.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.overlap import PENDING_TOKEN
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.settings import MethodSettings
from amulet_core.model.loading import ModelConfig
from tests.engine.test_engine import METHODS, drain, expected, make_request, mixed_requests, prompts

FIELDS = {"max_model_len": 256, "kv_cache_tokens": 4096}


def engines(loaded, **fields) -> dict[bool, LLMEngine]:
    config = EngineConfig(**{**FIELDS, **fields})
    return {overlap: LLMEngine(loaded, dataclasses.replace(config, overlap_host=overlap)) for overlap in (True, False)}


def outputs_of(engine: LLMEngine, requests: list[GenerationRequest], join_at: int | None = None) -> dict[str, list]:
    """Every request's outputs, the requests after the first half added at step ``join_at`` (all at once if None)."""
    first = requests if join_at is None else requests[: len(requests) // 2]
    for r in first:
        engine.add_request(r)

    def join(step: int) -> None:
        if join_at is not None and step == join_at:
            for r in requests[len(requests) // 2 :]:
                engine.add_request(r)

    outs = drain(engine, on_step=join)
    assert not engine.has_work() and engine.pending is None
    assert engine.blocks.num_used == 0  # the rows computed for requests that had stopped gave their blocks back
    return {rid: [comparable(o) for o in got] for rid, got in outs.items()}


def comparable(output: GenerationOutput) -> tuple:
    usage = output.usage
    return (output.text, output.token_ids, output.logprobs, output.finish_reason, output.error, usage)


def streamed_part(output: GenerationOutput) -> tuple:
    usage = output.usage
    return (output.text, output.token_ids, output.finish_reason, usage and usage.completion_tokens)


def sampled_requests(loaded) -> list[GenerationRequest]:
    """Seeded sampling (temperature, top-k, top-p, min-p), log-probabilities, a stop string, a stop token id."""
    pref, base = prompts(21, shared=12, pref_extra=5, base_extra=2)
    amulet = MethodSettings()
    third = expected(loaded, make_request("x", METHODS[2], pref, base, max_tokens=3, ignore_eos=True), stop=False)[2]
    return [
        make_request("t", amulet, pref, base, max_tokens=14, temperature=1.3, seed=5, ignore_eos=True),
        make_request("k", amulet, pref, base, max_tokens=9, temperature=0.9, top_k=20, top_p=0.9, seed=6),
        make_request("m", METHODS[0], pref, base, max_tokens=11, temperature=1.0, min_p=0.05, seed=7),
        make_request("lp", amulet, pref, base, max_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True),
        make_request("s", amulet, pref, base, max_tokens=16, stop=("e",), ignore_eos=True),  # a letter of most words
        make_request("e", METHODS[2], pref, base, max_tokens=16, stop_token_ids=(third,), ignore_eos=True),
    ]


def test_overlapped_greedy_answers_equal_the_reference_and_the_synchronous_engine(tiny_model):
    loaded = tiny_model("llama")
    pair = engines(loaded, max_num_batched_tokens=48)  # chunked prefills and late joiners beside the decodes
    requests = mixed_requests()
    got = {overlap: outputs_of(engine, requests, join_at=4) for overlap, engine in pair.items()}
    assert got[True] == got[False]
    for r in requests:
        assert [t for o in got[True][r.request_id] for t in o[1]] == expected(loaded, r), r.request_id
    assert pair[True].overlapped_steps > 10 and pair[False].overlapped_steps == 0


def test_overlapped_sampling_stops_and_logprobs_equal_the_synchronous_engine(tiny_model):
    loaded = tiny_model("qwen2")
    pair = engines(loaded)
    requests = sampled_requests(loaded)
    got = {overlap: outputs_of(engine, requests) for overlap, engine in pair.items()}
    assert got[True] == got[False]
    reasons = {rid: outs[-1][3] for rid, outs in got[True].items()}
    assert reasons == {"t": "length", "k": "length", "m": "length", "lp": "length", "s": "stop", "e": "stop"}
    assert pair[True].overlapped_steps > 5


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padded_decode_steps_take_the_pending_tokens_from_the_device(tiny_model, family):
    """The decode graphs' path (run eagerly here): each row's input token is the previous step's, filled in on the
    device; every method's answer is the reference's."""
    loaded = tiny_model(family)
    engine = LLMEngine(loaded, EngineConfig(**FIELDS, overlap_host=True))
    if engine.runner.graphs is None:
        engine.runner.use_decode_graphs(capture=False)
    pref, base = prompts(2, shared=20, pref_extra=9, base_extra=3)
    requests = [make_request(f"r{i}", s, pref, base, max_tokens=10) for i, s in enumerate(METHODS)]
    outs = outputs_of(engine, requests)
    for r in requests:
        assert [t for o in outs[r.request_id] for t in o[1]] == expected(loaded, r), r.request_id
    assert engine.runner.graphs is not None and engine.runner.graphs.steps >= 8 and engine.overlapped_steps >= 8


def test_preemption_while_a_step_is_in_flight_keeps_answers_exact(tiny_model):
    """A KV budget so small that groups are preempted (and re-prefilled) while their last token is still pending."""
    loaded = tiny_model("llama")
    engine = LLMEngine(
        loaded, EngineConfig(max_model_len=64, kv_cache_tokens=128, block_size=4, max_num_seqs=8, overlap_host=True)
    )
    requests = []
    for i in range(4):
        pref, base = prompts(40 + i, shared=12, pref_extra=4, base_extra=1)
        requests.append(make_request(f"p{i}", METHODS[3], pref, base, max_tokens=24, ignore_eos=True))
    preempted = []
    schedule = engine.scheduler.schedule

    def watched():
        plan = schedule()
        preempted.extend(g.request_id for g in plan.preempted)
        return plan

    engine.scheduler.schedule = watched  # type: ignore[method-assign]
    outs = outputs_of(engine, requests)
    assert preempted, "no group was preempted: the test would not exercise it"
    for r in requests:
        assert [t for o in outs[r.request_id] for t in o[1]] == expected(loaded, r, stop=False), r.request_id
    assert engine.overlapped_steps > 0


def test_an_abort_while_its_token_is_pending_frees_everything(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(**FIELDS, overlap_host=True))
    pref, base = prompts(5, shared=10, pref_extra=3, base_extra=2)
    keep = make_request("keep", METHODS[3], pref, base, max_tokens=12, ignore_eos=True)
    gone = make_request("gone", METHODS[3], pref, base, max_tokens=12, ignore_eos=True)
    engine.add_request(keep)
    engine.add_request(gone)
    for _ in range(4):
        engine.step()
    assert engine.pending is not None and any(s.request.request_id == "gone" for s in engine.pending.states)
    aborted = engine.abort("gone")
    assert aborted is not None and aborted.finish_reason == "abort"
    outs = drain(engine)
    assert "gone" not in outs
    kept = [t for o in outs["keep"] for t in o.token_ids]
    assert len(kept) == 12 - 3  # the first three steps' tokens came out of the loop above
    assert engine.blocks.num_used == 0 and not engine.has_work()


def test_requests_that_need_the_host_between_tokens_run_synchronously_beside_overlapped_ones(tiny_model):
    """A grammar's mask and the penalties read each token before the next: a step holding such a request is not
    overlapped (the pending tokens are read first), and every answer is the synchronous engine's."""
    loaded = tiny_model("llama")
    pair = engines(loaded)
    pref, base = prompts(8, shared=10, pref_extra=4, base_extra=2)
    grammar = GrammarSpec(GrammarKind.REGEX, r"[a-z ]{3,12}")
    plain = [make_request(f"a{i}", METHODS[3], pref, base, max_tokens=10, ignore_eos=True) for i in range(2)]
    late = [
        make_request("pen", METHODS[3], pref, base, max_tokens=8, temperature=0.8, seed=1, presence_penalty=0.5),
        make_request("g", METHODS[0], pref, base, max_tokens=10, grammar=grammar),
    ]
    got = {overlap: outputs_of(engine, plain + late, join_at=3) for overlap, engine in pair.items()}
    assert got[True] == got[False]
    engine = pair[True]
    assert 0 < engine.overlapped_steps < engine.steps  # some steps overlapped, the ones with "pen" or "g" not


def test_a_pending_token_never_reaches_a_hash_or_an_output(tiny_model):
    """Placeholders live only between a launch and the next step's read: after every step the only ones left are
    those of the step in flight, and no output, no prefix-cache block carries one."""
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(**FIELDS, overlap_host=True, block_size=4))
    pref, base = prompts(6, shared=16, pref_extra=4, base_extra=3)
    for i in range(3):
        engine.add_request(make_request(f"h{i}", METHODS[3 if i else 0], pref, base, max_tokens=9, ignore_eos=True))
    while engine.has_work():
        for out in engine.step():
            assert PENDING_TOKEN not in out.token_ids
        in_flight = {id(s) for s in (engine.pending.states if engine.pending else ())}
        for state in engine.requests.values():
            for seq in state.group.seqs:
                assert seq.token_ids.count(PENDING_TOKEN) == (id(state) in in_flight)
        assert all(PENDING_TOKEN not in block.tokens for block in engine.blocks.blocks)
    assert engine.overlapped_steps > 5


def test_the_asyncio_client_streams_the_same_tokens_with_the_host_overlapped(tiny_model):
    """The server's path: the worker thread steps an overlapping engine; each stream gets every token once, in order,
    and ends with its usage, as from the synchronous engine (the requests arrive concurrently: their order, and so
    their prefix-cache hits, may differ between the runs; their tokens may not)."""
    loaded = tiny_model("llama")
    pref, base = prompts(9, shared=14, pref_extra=3, base_extra=2)
    requests = [make_request(f"a{i}", METHODS[i % 4], pref, base, max_tokens=7 + i, ignore_eos=True) for i in range(4)]
    streamed = {}
    for overlap in (True, False):
        config = EngineConfig(**FIELDS, overlap_host=overlap)
        threads = ModelConfig(cpu_threads=torch.get_num_threads())
        client = AsyncEngine(threads, config, loader=lambda _: loaded).start()
        client.wait_ready(60)

        async def one(request: GenerationRequest, client: AsyncEngine = client) -> list:
            # Which request hits the others' prefix in the cache depends on when each arrived: not compared.
            return [streamed_part(o) for o in [o async for o in client.generate(request)]]

        async def every() -> list:
            return await asyncio.gather(*(one(r) for r in requests))

        try:
            streamed[overlap] = asyncio.run(every())
        finally:
            client.close()
    assert streamed[True] == streamed[False]
    for r, outs in zip(requests, streamed[True], strict=True):
        assert [t for o in outs for t in o[1]] == expected(loaded, r, stop=False)
        assert outs[-1][2] == "length" and outs[-1][3] == r.sampling.max_tokens


def test_a_request_whose_last_token_was_pending_when_a_synchronous_step_came_gets_no_token_more(tiny_model):
    """ "short"'s third and last token is in flight when "pen" (penalties: stepped synchronously) joins: the
    synchronous step reads it, finishes "short", and samples only the others' rows."""
    loaded = tiny_model("llama")
    pair = engines(loaded)
    pref, base = prompts(12, shared=10, pref_extra=3, base_extra=2)
    requests = [
        make_request("short", METHODS[3], pref, base, max_tokens=3, ignore_eos=True),
        make_request("long", METHODS[0], pref, base, max_tokens=8, ignore_eos=True),
        make_request("pen", METHODS[3], pref, base, max_tokens=5, temperature=0.7, seed=2, frequency_penalty=0.4),
        make_request("pen2", METHODS[0], pref, base, max_tokens=5, temperature=0.7, seed=3, presence_penalty=0.4),
    ]
    got = {overlap: outputs_of(engine, requests, join_at=3) for overlap, engine in pair.items()}
    assert got[True] == got[False]
    assert [t for o in got[True]["short"] for t in o[1]] == expected(loaded, requests[0], stop=False)
    assert pair[True].overlapped_steps == 3  # the prefill's step and the next two; then "pen" is in every step
