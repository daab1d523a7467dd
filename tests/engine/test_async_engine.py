"""The asyncio client of the engine: streaming, overload, abort on close, a free event loop."""

from __future__ import annotations

import asyncio

import pytest
import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import EngineNotReadyError, EngineOverloadedError
from amulet_core.method.settings import MethodSettings
from amulet_core.model.loading import ModelConfig
from amulet_core.sampling.params import SamplingParams


def amulet_request(rid: str, max_tokens: int = 8) -> GenerationRequest:
    pref = tuple(range(100, 140))
    base = tuple(range(100, 130))
    return GenerationRequest(
        rid, pref, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), MethodSettings(), base
    )


@pytest.fixture
def engine(tiny_model):
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=256, kv_cache_tokens=4096, max_num_seqs=2, max_queue=2)
    threads = ModelConfig(cpu_threads=torch.get_num_threads())  # leave the test process's threads as they are
    eng = AsyncEngine(threads, config, loader=lambda _: loaded).start()
    eng.wait_ready(60)
    yield eng
    eng.close()


def test_not_ready_before_start(tiny_model):
    eng = AsyncEngine(loader=lambda _: tiny_model("llama"))
    assert not eng.ready

    async def go():
        async for _ in eng.generate(amulet_request("x")):
            pass

    with pytest.raises(EngineNotReadyError):
        asyncio.run(go())


def test_streams_tokens_and_a_final_usage(engine):
    async def go():
        outs = [o async for o in engine.generate(amulet_request("a", 6))]
        return outs

    outs = asyncio.run(go())
    assert sum(len(o.token_ids) for o in outs) == 6
    assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 6
    assert outs[-1].usage.base_prompt_tokens == 30 and outs[-1].timings is not None


def test_full_queue_is_an_overload_error_not_a_hang(engine):
    async def go():
        # max_num_seqs=2 runs one amulet request; max_queue=2 lets two wait; the fourth is refused.
        streams = [engine.generate(amulet_request(f"q{i}", 200)) for i in range(3)]
        firsts = [asyncio.ensure_future(streams[0].__anext__())]
        await asyncio.wait_for(firsts[0], 30)
        firsts += [asyncio.ensure_future(s.__anext__()) for s in streams[1:]]
        await asyncio.sleep(0)
        assert engine.stats().running_requests == 1
        for _ in range(100):  # the worker has seen the two waiting ones
            if engine.stats().waiting_requests == 2:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().waiting_requests == 2
        with pytest.raises(EngineOverloadedError):
            await engine.generate(amulet_request("q3")).__anext__()
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()

    asyncio.run(go())


def test_closing_the_stream_aborts_and_frees_kv(engine):
    async def go():
        stream = engine.generate(amulet_request("gone", 200))
        await stream.__anext__()
        assert engine.stats().kv_blocks_used > 0
        await stream.aclose()
        for _ in range(200):
            stats = engine.stats()
            if stats.kv_blocks_used == 0 and stats.running_requests == 0:
                return stats
            await asyncio.sleep(0.02)
        raise AssertionError(f"KV not freed: {engine.stats()}")

    asyncio.run(go())


def test_event_loop_keeps_running_while_the_model_works(engine):
    async def go():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        async for _ in engine.generate(amulet_request("t", 40)):
            pass
        done.set()
        await task
        return ticks

    # The loop spins the ticker between every output: far more ticks than tokens.
    assert asyncio.run(go()) > 40


def test_a_cpu_engine_runs_and_logs_its_configured_torch_threads(tiny_model, caplog: pytest.LogCaptureFixture) -> None:
    """The worker thread sets its torch threads (OpenMP's count is the calling thread's) and says how many."""
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=256, kv_cache_tokens=4096)
    with caplog.at_level("INFO", logger="amulet_core.engine.async_engine"):
        eng = AsyncEngine(ModelConfig(cpu_threads=2), config, loader=lambda _: loaded).start()
        eng.wait_ready(60)
        eng.close()
    assert "serving on the CPU with 2 torch threads (--cpu-threads)" in caplog.messages
