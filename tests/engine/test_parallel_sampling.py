"""``generate_choices``: n choices per prompt over the real engine (tiny model), sharing the prompt's KV."""

from __future__ import annotations

import asyncio

import pytest
import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import EngineOverloadedError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import ModelConfig
from amulet_core.sampling.params import SamplingParams
from tests.support.live_server import wait_until

PROMPT = tuple(range(100, 150))  # 50 tokens: three full blocks of 16 and a partial one


def request(rid: str, seed: int | None = 5, max_tokens: int = 5, prompt: tuple[int, ...] = PROMPT) -> GenerationRequest:
    """A sampled request decoded from one context (Amulet's mask keeps too few tokens for the draws to differ)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)
    return GenerationRequest(rid, prompt, sampling, MethodSettings(method=Method.BASE))


@pytest.fixture
def engine(tiny_model):
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=256, kv_cache_tokens=4096, max_num_seqs=16, max_queue=3, block_size=16)
    eng = AsyncEngine(ModelConfig(cpu_threads=torch.get_num_threads()), config, loader=lambda _: loaded).start()
    eng.wait_ready(60)
    yield eng
    eng.close()


def collect(engine: AsyncEngine, prompts: list[GenerationRequest], n: int) -> dict[int, list[int]]:
    async def go() -> list[ChoiceOutput]:
        return [c async for c in generate_choices(engine, prompts, n)]

    tokens: dict[int, list[int]] = {}
    for choice in asyncio.run(go()):
        tokens.setdefault(choice.index, []).extend(choice.output.token_ids)
    return tokens


def test_each_choice_is_the_request_with_its_own_seed(engine: AsyncEngine) -> None:
    together = collect(engine, [request("r")], 3)
    alone = [collect(engine, [request(f"alone-{j}", seed=5 + j)], 1)[0] for j in range(3)]
    assert [together[j] for j in range(3)] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_choices_after_the_first_reuse_the_prompt_blocks(engine: AsyncEngine) -> None:
    before = engine.stats()
    collect(engine, [request("fresh", prompt=tuple(range(300, 350)))], 4)
    after = engine.stats()
    # The first choice prefills; the three others find the prompt's full blocks in the prefix cache.
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 3


def test_several_prompts_are_numbered_prompt_major(engine: AsyncEngine) -> None:
    other = tuple(range(200, 230))
    got = collect(engine, [request("a", max_tokens=2), request("b", max_tokens=3, prompt=other)], 2)
    assert {i: len(t) for i, t in got.items()} == {0: 2, 1: 2, 2: 3, 3: 3}


def test_a_refused_choice_fails_the_whole_request_and_leaves_nothing_running(engine: AsyncEngine) -> None:
    with pytest.raises(EngineOverloadedError):
        collect(engine, [request("big", max_tokens=50)], 8)  # more than max_queue can take
    wait_until(lambda: engine.engine.requests == {}, timeout=120, what="every choice to be aborted")


def test_closing_early_aborts_every_choice(engine: AsyncEngine) -> None:
    async def go() -> None:
        stream = generate_choices(engine, [request("c", max_tokens=200)], 3)
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(go())
    wait_until(lambda: engine.engine.requests == {}, timeout=120, what="every choice to be aborted")
