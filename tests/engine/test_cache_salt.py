"""Tenants in the prefix cache: a ``cache_salt`` keeps one caller's cached blocks from another's.

The block manager finds a sequence's cached blocks only under its own salt (unsalted and salted caches
are apart too); the engine then reports ``cached_prompt_tokens`` only for hits of the same salt, and
the answer is the same whatever the salt.
"""

from __future__ import annotations

import random

from amulet_core.engine.block_manager import BlockManager, block_hash, chain_root
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.engine.sequence import Sequence
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, tokens_of

BS = 4


def computed(bm: BlockManager, tokens: list[int], salt: str | None) -> Sequence:
    """A sequence of ``tokens`` under ``salt`` whose KV is computed and published, then freed (still cached)."""
    seq = Sequence(list(tokens), cache_salt=salt)
    bm.allocate([seq])
    seq.num_computed = len(tokens)
    bm.register_computed(seq)
    bm.free(seq)
    return seq


def hits(bm: BlockManager, tokens: list[int], salt: str | None) -> int:
    return len(bm._cached_prefix(Sequence(list(tokens), cache_salt=salt)))


def test_a_salt_finds_only_its_own_blocks():
    tokens = list(range(100, 117))  # 4 full blocks before the last token
    bm = BlockManager(32, BS)
    computed(bm, tokens, "tenant-a")
    assert hits(bm, tokens, "tenant-a") == 4
    assert hits(bm, tokens, "tenant-b") == 0
    assert hits(bm, tokens, None) == 0
    computed(bm, tokens, None)
    assert hits(bm, tokens, None) == 4
    assert hits(bm, tokens, "tenant-b") == 0
    assert hits(bm, tokens, "") == 0  # the empty salt is a salt, not the unsalted cache


def test_the_chain_root_separates_salts_and_never_equals_a_blocks_hash():
    assert chain_root(None) is None
    assert chain_root("a") != chain_root("b")
    assert chain_root("a") == chain_root("a")
    first = [1, 2, 3, 4]
    assert block_hash(chain_root("a"), first) != block_hash(None, first)
    assert block_hash(None, first) != block_hash(None, [1, 2, 3, 5])
    # the hash is stable across processes (no PYTHONHASHSEED): a fixed value
    assert block_hash(None, first) == block_hash(None, tuple(first))


def test_a_salted_request_sees_no_cached_tokens_of_another_salt(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    rng = random.Random(11)
    prompt = tuple(rng.randrange(10, 5000) for _ in range(70))
    settings = MethodSettings(method=Method.BASE)

    def run(rid: str, salt: str | None) -> tuple[list[int], int]:
        request = GenerationRequest(rid, prompt, SamplingParams(max_tokens=6, temperature=0), settings, cache_salt=salt)
        engine.add_request(request)
        outs = drain(engine)[rid]
        usage = outs[-1].usage
        assert usage is not None
        return tokens_of(outs), usage.cached_prompt_tokens

    first, cached = run("a1", "a")
    assert cached == 0
    for rid, salt in (("b1", "b"), ("none", None)):
        answer, cached = run(rid, salt)
        assert cached == 0, f"salt {salt!r} saw {cached} cached tokens of salt 'a'"
        assert answer == first
    answer, cached = run("a2", "a")
    assert cached >= 64 and answer == first  # the same salt is served from the cache


def test_a_salted_amulet_request_shares_its_contexts_prefix_within_the_request(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    rng = random.Random(5)
    head = [rng.randrange(10, 5000) for _ in range(48)]
    pref, base = tuple(head + [7, 8, 9]), tuple(head + [11])
    settings = MethodSettings(method=Method.AMULET)
    params = SamplingParams(max_tokens=5, temperature=0)
    unsalted = GenerationRequest("u", pref, params, settings, base)
    engine.add_request(unsalted)
    expected = tokens_of(drain(engine)["u"])
    engine.add_request(GenerationRequest("s", pref, params, settings, base, cache_salt="tenant"))
    outs = drain(engine)["s"]
    usage = outs[-1].usage
    assert tokens_of(outs) == expected and usage is not None and usage.cached_prompt_tokens == 0
