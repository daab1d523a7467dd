"""A request's contexts share the blocks of their common prefix (issue 26, item 2).

With the preference at the end of the conversation (``Placement.END``) the K preference contexts and the
contrast context agree on every token before it: a prefix ``P``. Its ``floor(P / B)`` full blocks are
allocated once, referenced by every context, prefilled once (by the first context, the leader) and freed
once; the group is preempted and recomputed as a unit; the next turn finds ``P`` in the prefix cache for
every context; the KV usage metric counts a shared block once.

First the block manager and scheduler over plain ``Sequence`` objects (no tensors): a small oracle stands
for the KV cache, recording which token prefix each cache slot holds, and checks that every position a
chunk attends to holds the KV of that sequence's own prefix when it is read (a forward pass writes all its
new tokens' KV before any attention reads). Then the engine on tiny random models in float32, greedy
outputs token for token the same with the sharing on and off (and equal to the reference loop), for
contexts built by the END placement through SmolLM2's chat template.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable

import pytest

from amulet_core.engine.block_manager import BlockManager
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.parallel_sampling import choice_request
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.engine.scheduler import ScheduledChunk, Scheduler, SequenceGroup, StepPlan
from amulet_core.engine.sequence import Sequence
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.mixture import MAX_PREFERENCES
from amulet_core.method.preference_prompts import Placement, preference_contexts
from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, tokens_of
from tests.support.oracle import reference_answer
from tests.support.step_spy import spy_passes

BS = 4


# ---------------------------------------------------------------- block level: no tensors


class KVOracle:
    """Stands for the KV cache: what each slot holds is the token prefix whose last token's KV it is."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, tuple[int, ...]] = {}
        self.writes: Counter[int] = Counter()
        self.computed: Counter[int] = Counter()
        """Tokens computed per sequence (by id), over the whole run."""

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.bs] * self.bs + position % self.bs

    def step(self, plan: StepPlan) -> None:
        """One forward pass: every chunk's new KV written, then every chunk's whole context read."""
        for c in plan.chunks:
            self.computed[id(c.seq)] += c.num_tokens
            for p in range(c.start, c.start + c.num_tokens):
                slot = self.slot(c.seq, p)
                self.slots[slot] = tuple(c.seq.token_ids[: p + 1])
                self.writes[slot] += 1
        for c in plan.chunks:
            for p in range(c.start + c.num_tokens):
                held = self.slots.get(self.slot(c.seq, p))
                assert held == tuple(c.seq.token_ids[: p + 1]), f"position {p} of a sequence read before it was written"


def end_placed(rng: random.Random, prefix: int, tails: list[int]) -> list[list[int]]:
    """Contexts with ``prefix`` tokens in common, then each its own tail (its sentence and the generation prompt)."""
    head = [rng.randrange(10, 5000) for _ in range(prefix)]
    return [head + [rng.randrange(5000, 9000) for _ in range(n)] for n in tails]


def make_group(rid: str, contexts: list[list[int]]) -> SequenceGroup:
    return SequenceGroup(rid, [Sequence(list(c)) for c in contexts])


def step(s: Scheduler, oracle: KVOracle, token: int) -> StepPlan:
    plan = s.schedule()
    oracle.step(plan)
    s.complete_step(plan)
    for g in plan.sampled:  # the chosen token goes to every context of the request
        for seq in g.seqs:
            seq.token_ids.append(token)
    return plan


def decode(s: Scheduler, oracle: KVOracle, new_tokens: int, first_token: int = 20000) -> list[StepPlan]:
    """Step until every group has sampled ``new_tokens`` tokens (each removed then); the plans in order."""
    sampled = Counter[str]()
    plans = []
    for i in range(10_000):
        if not s.has_work():
            return plans
        plan = step(s, oracle, first_token + i)
        plans.append(plan)
        for g in plan.sampled:
            sampled[g.request_id] += 1
            if sampled[g.request_id] == new_tokens:
                s.remove(g)
    raise AssertionError("the scheduler did not finish")


def shared_blocks(contexts: list[list[int]], bs: int) -> int:
    """floor(P / B), P the longest common prefix (the last token of each context never counts: its logits are needed)."""
    p = 0
    while all(len(c) > p + 1 for c in contexts) and len({c[p] for c in contexts}) == 1:
        p += 1
    return p // bs


@pytest.mark.parametrize("k", [1, 2, MAX_PREFERENCES])
@pytest.mark.parametrize("prefix", [17, 20, 23])
def test_prefix_blocks_are_allocated_once_and_referenced_by_every_context(k, prefix):
    contexts = end_placed(random.Random(k * 100 + prefix), prefix, [5 + 2 * i for i in range(k)] + [2])
    bm = BlockManager(256, BS)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=512)
    g = make_group("g", contexts)
    s.add(g)
    s.schedule()
    n = prefix // BS
    assert shared_blocks(contexts, BS) == n
    leader = g.leader
    for seq in g.seqs:
        assert seq.block_table[:n] == leader.block_table[:n]
    for block_id in leader.block_table[:n]:
        assert bm.blocks[block_id].ref_count == k + 1
    own = [b for seq in g.seqs for b in seq.block_table[n:]]
    assert len(own) == len(set(own)) and not set(own) & set(leader.block_table[:n])
    # The KV usage counts a shared block once: floor(P/B) + sum_i ceil((P mod B + t_i + 1) / B).
    expected = n + sum(bm.blocks_needed(len(c) - n * BS + 1) for c in contexts)
    assert bm.num_used == expected == len(set(b for seq in g.seqs for b in seq.block_table))


@pytest.mark.parametrize("budget", [9, 13, 24, 512])
@pytest.mark.parametrize("k", [1, 3, MAX_PREFERENCES])
def test_prefix_is_prefilled_once_by_the_leader_and_read_after_it_is_written(budget, k):
    """Chunked prefill included: a follower is never scheduled to read shared blocks not yet computed."""
    contexts = end_placed(random.Random(budget + k), 41, [6 + i for i in range(k)] + [3])
    bm = BlockManager(256, BS)
    s = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=budget)
    oracle = KVOracle(BS)
    g = make_group("g", contexts)
    s.add(g)
    n = shared_blocks(contexts, BS)
    prompt_lens = [len(c) for c in contexts]
    plans = decode(s, oracle, new_tokens=3)
    if budget < sum(prompt_lens):
        assert sum(1 for p in plans if not p.sampled) >= 2, "the prefill was meant to span several steps"
    leader, followers = g.seqs[0], g.seqs[1:]
    # The prompt, then 2 decode tokens each (the third sampled token is never computed): P once, by the leader.
    assert oracle.computed[id(leader)] == prompt_lens[0] + 2
    for seq, length in zip(followers, prompt_lens[1:], strict=True):
        assert oracle.computed[id(seq)] == length - n * BS + 2
    assert all(count == 1 for count in oracle.writes.values()), "a slot was written twice: prefilled more than once"


def test_a_follower_waits_for_the_leader_under_chunked_prefill():
    contexts = end_placed(random.Random(7), 48, [9, 2])
    bm = BlockManager(256, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    oracle = KVOracle(BS)
    g = make_group("g", contexts)
    s.add(g)
    leader, follower = g.seqs
    seen: list[tuple[int, int]] = []  # per step: the leader's computed tokens after it, the follower's chunk
    for _ in range(20):
        plan = step(s, oracle, 1)
        seen.append((leader.num_computed, sum(c.num_tokens for c in plan.chunks if c.seq is follower)))
        if plan.sampled:
            break
    assert plan.sampled == [g] and follower.shared_with_leader == 48
    assert [computed for computed, _ in seen[:3]] == [16, 32, 48]  # the leader's prefill spans steps
    assert all(taken == 0 for computed, taken in seen if computed < 48)
    assert sum(taken for _, taken in seen) == len(contexts[1]) - 48  # then only its own remainder


def test_the_group_frees_each_block_once_and_the_prefix_stays_cached():
    contexts = end_placed(random.Random(3), 30, [7, 9, 2])
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
    oracle = KVOracle(BS)
    g = make_group("g", contexts)
    s.add(g)
    s_plan = step(s, oracle, 1)
    assert s_plan.sampled == [g]
    shared = list(g.leader.block_table[: 30 // BS])
    step(s, oracle, 2)
    s.remove(g)
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks and sorted(bm._free) == list(range(bm.num_blocks))
    for context in contexts:  # every context of a later request finds the shared blocks
        assert bm._cached_prefix(Sequence(list(context)))[: len(shared)] == shared


def test_an_abort_mid_prefill_drops_every_reference_and_keeps_what_the_leader_computed():
    contexts = end_placed(random.Random(8), 40, [6, 2])
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    oracle = KVOracle(BS)
    g = make_group("g", contexts)
    s.add(g)
    step(s, oracle, 1)
    step(s, oracle, 1)
    assert g.leader.num_computed == 32 and g.seqs[1].num_computed == 40  # (its 40 shared, not computed yet)
    s.remove(g)  # what an abort does
    assert bm.num_used == 0 and all(b.ref_count == 0 for b in bm.blocks) and not s.has_work()
    again = make_group("again", contexts)
    s.add(again)
    s.max_num_batched_tokens = 8
    plan = step(s, oracle, 1)
    # The leader's 8 computed blocks come from the cache; the follower shares the leader's 10 and waits for them.
    assert again.leader.num_computed == 32 + 8 and again.seqs[1].num_cached_prompt == 32
    assert [c.seq for c in plan.chunks] == [again.leader]
    decode(s, oracle, new_tokens=2)
    assert bm.num_used == 0


def test_sharing_off_gives_every_context_its_own_blocks():
    contexts = end_placed(random.Random(4), 30, [7, 2])
    bm = BlockManager(64, BS, share_context_prefix=False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
    oracle = KVOracle(BS)
    g = make_group("g", contexts)
    s.add(g)
    step(s, oracle, 1)
    a, b = g.seqs
    assert not set(a.block_table) & set(b.block_table) and b.shared_with_leader == 0
    assert bm.num_used == sum(bm.blocks_needed(len(c) + 1) for c in contexts)
    assert oracle.computed[id(b)] == len(contexts[1])


def test_a_shared_group_is_preempted_and_recomputed_as_a_unit():
    bm = BlockManager(40, BS)
    s = Scheduler(bm, max_num_seqs=12, max_num_batched_tokens=24)
    oracle = KVOracle(BS)
    rng = random.Random(5)
    groups = [make_group(f"g{i}", end_placed(rng, 30, [5, 7, 2][: 2 + i % 2])) for i in range(3)]
    for g in groups:
        s.add(g)
    preempted: list[SequenceGroup] = []
    sampled = Counter[str]()
    for i in range(10_000):
        if not s.has_work():
            break
        plan = s.schedule()
        for g in plan.preempted:
            preempted.append(g)
            assert g in s.waiting and g not in s.running
            assert all(not seq.block_table and seq.num_computed == 0 and seq.shared_with_leader == 0 for seq in g.seqs)
        for g in plan.admitted:  # (re)admitted: the followers share the leader's blocks again
            n = shared_blocks([seq.token_ids for seq in g.seqs], BS)
            assert all(seq.block_table[:n] == g.leader.block_table[:n] for seq in g.seqs)
        running = {id(seq) for g in s.running for seq in g.seqs}
        assert all(id(c.seq) in running for c in plan.chunks)
        # A group is scheduled whole or not at all when sampled: no context of a sampled group is missing.
        oracle.step(plan)
        s.complete_step(plan)
        for g in plan.sampled:
            for seq in g.seqs:
                seq.token_ids.append(30000 + i)
            sampled[g.request_id] += 1
            if sampled[g.request_id] == 12:
                s.remove(g)
        assert bm.num_used == len({b for g in s.running for seq in g.seqs for b in seq.block_table})
    else:
        raise AssertionError("the scheduler did not finish")
    assert preempted, "the small cache was meant to force preemption"
    assert all(count == 12 for count in sampled.values()) and len(sampled) == 3
    assert bm.num_used == 0 and all(b.ref_count == 0 for b in bm.blocks)


def test_the_next_turn_finds_the_prefix_in_the_cache_for_every_context():
    rng = random.Random(6)
    bm = BlockManager(128, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
    oracle = KVOracle(BS)
    conversation = [rng.randrange(10, 5000) for _ in range(45)]
    gen_prompt = [1, 2, 3]
    sentences = [[6001, 6002, 6003, 6004], [7001, 7002, 7003, 7004, 7005]]

    def turn(rid: str, conv: list[int]) -> SequenceGroup:
        return make_group(rid, [conv + sentence + gen_prompt for sentence in sentences] + [conv + gen_prompt])

    first = turn("t1", conversation)
    s.add(first)
    decode(s, oracle, new_tokens=9, first_token=40000)
    answer = first.seqs[-1].token_ids[len(conversation) + len(gen_prompt) :]
    assert len(answer) == 9
    # The next turn: the conversation as the contrast context saw it, the answer, the next user message.
    conversation2 = conversation + gen_prompt + answer + [rng.randrange(10, 5000) for _ in range(6)]
    hits, queries = bm.prefix_hits, bm.prefix_queries
    second = turn("t2", conversation2)
    s.add(second)
    plan = step(s, oracle, 1)
    assert bm.prefix_queries - queries == 3 and bm.prefix_hits - hits == 3  # every context served
    # Turn 1 computed the conversation and all but the last answer token: those full blocks are cached.
    cached = (len(conversation) + len(gen_prompt) + len(answer) - 1) // BS
    leader = second.leader
    assert leader.num_cached_prompt == cached * BS
    n = shared_blocks([seq.token_ids[:-1] for seq in second.seqs], BS)  # (before this step's sampled token)
    chunks = {id(c.seq): c for c in plan.chunks}
    assert chunks[id(leader)] == ScheduledChunk(leader, cached * BS, len(leader.token_ids) - 1 - cached * BS)
    for seq in second.seqs[1:]:
        assert seq.num_cached_prompt == cached * BS
        assert chunks[id(seq)].start == n * BS  # each context computes only its own remainder
        assert seq.block_table[:n] == leader.block_table[:n]


# ---------------------------------------------------------------- the engine: tiny random models, float32

TURNS = [
    ("How do I keep basil alive on a windowsill?", "Water it when the top of the soil is dry and give it sun."),
    ("And how often should I pinch the tops?", "Every week or two, just above a pair of leaves."),
    ("Can I grow it from cuttings?", None),
]


def conversation(turns=TURNS, system: str | None = "You are a helpful gardener.") -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def end_contexts(tokenizer, prefs: list[str], negative: str | None = None, turns=TURNS) -> list[tuple[int, ...]]:
    """The K preference contexts then the contrast one, END placement, through the chat template."""
    built = preference_contexts(conversation(turns), prefs, negative=negative, placement=Placement.END)
    return [tuple(render_chat(tokenizer, m)) for m in [*built.prefs, built.contrast]]


def amulet_request(rid: str, contexts: list[tuple[int, ...]], max_tokens: int = 8, **sampling) -> GenerationRequest:
    k = len(contexts) - 1
    settings = sampling.pop("settings", MethodSettings(weights=(1.0, 2.0, 1.0)[:k] if k > 1 else ()))
    params = SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0), **sampling)
    return GenerationRequest(rid, contexts[0], params, settings, contexts[k], tuple(contexts[1:k]))


expected = reference_answer


def make_engine(loaded, share: bool, **config) -> LLMEngine:
    """Sharing on: the defaults. Off: every context holds and prefills its own copy (no prefix cache either)."""
    settings = dict(max_model_len=512, kv_cache_tokens=8192) | config
    engine = LLMEngine(loaded, EngineConfig(enable_prefix_cache=share, **settings))
    engine.blocks.share_context_prefix = share
    return engine


class ChunkLog:
    """Every chunk the engine's forward passes ran, and the KV blocks in use during each pass."""

    def __init__(self, engine: LLMEngine) -> None:
        self.chunks: list[ScheduledChunk] = []
        self.kv_used: list[int] = []

        def spy(chunks, logits_for, logits):
            self.chunks += chunks
            self.kv_used.append(engine.stats().kv_blocks_used)

        spy_passes(engine, spy, whole_rows=False)

    def computed(self, seq: Sequence, upto: int) -> int:
        """Tokens of ``seq`` computed at positions below ``upto``."""
        return sum(max(0, min(c.start + c.num_tokens, upto) - c.start) for c in self.chunks if c.seq is seq)


def common_prefix(contexts: list[tuple[int, ...]]) -> int:
    p = 0
    while all(len(c) > p for c in contexts) and len({c[p] for c in contexts}) == 1:
        p += 1
    return p


def run_both(loaded, requests: list[GenerationRequest], **config) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    answers = []
    for share in (True, False):
        engine = make_engine(loaded, share, **config)
        for r in requests:
            engine.add_request(r)
        answers.append({rid: tokens_of(outs) for rid, outs in drain(engine).items()})
        assert engine.blocks.num_used == 0
    return answers[0], answers[1]


def test_end_placement_contexts_share_a_long_prefix(smollm_tokenizer):
    contexts = end_contexts(smollm_tokenizer, ["concise", "formal"])
    p = common_prefix(contexts)
    assert p > 80 and all(len(c) - p < 25 for c in contexts), (p, [len(c) for c in contexts])


@pytest.mark.parametrize("budget", [None, 48])
@pytest.mark.parametrize("k", [1, 2])
def test_greedy_answers_are_the_same_with_sharing_on_and_off(tiny_model, k, budget):
    """Chunked prefill too (``budget`` 48: the leader's prefill spans several steps)."""
    loaded = tiny_model("llama")
    contexts = end_contexts(loaded.tokenizer, ["concise", "formal"][:k])
    request = amulet_request("r", contexts)
    answers, logs, groups = {}, {}, {}
    for share in (True, False):
        engine = make_engine(loaded, share, max_num_batched_tokens=budget)
        logs[share] = ChunkLog(engine)
        engine.add_request(request)
        groups[share] = engine.requests["r"].group
        answers[share] = tokens_of(drain(engine)["r"])
        assert engine.blocks.num_used == 0
    assert answers[True] == answers[False] == expected(loaded, request)
    # Prefilled once: the leader computes the whole prompt, every other context only what follows the full
    # blocks it has in common with the leader (the preference contexts share "Your answer should be" too);
    # without sharing every context computes its whole prompt.
    log, seqs = logs[True], groups[True].seqs
    shared = [shared_blocks([contexts[0], c], 16) for c in contexts[1:]]
    assert min(shared) == common_prefix(contexts) // 16 >= 5
    assert log.computed(seqs[0], len(contexts[0])) == len(contexts[0])
    for seq, context, n in zip(seqs[1:], contexts[1:], shared, strict=True):
        assert log.computed(seq, len(context)) == len(context) - n * 16
    for seq, context in zip(groups[False].seqs, contexts, strict=True):
        assert logs[False].computed(seq, len(context)) == len(context)
    if budget is not None:
        assert sum(1 for c in log.chunks if c.seq is seqs[0] and c.num_tokens > 1) >= 3
    # The KV usage counts a shared block once.
    blocks = [-(-(len(c) + 1) // 16) for c in contexts]
    assert log.kv_used[0] == blocks[0] + sum(b - n for b, n in zip(blocks[1:], shared, strict=True))
    assert logs[False].kv_used[0] == sum(blocks)


def test_n_2_every_choice_shares_and_the_second_finds_the_first_in_the_cache(tiny_model):
    loaded = tiny_model("qwen2")
    contexts = end_contexts(loaded.tokenizer, ["concise", "uplifting"])
    settings = MethodSettings(weights=(1.0, 1.0), plausibility=0.0)
    request = amulet_request("n2", contexts, max_tokens=8, settings=settings, temperature=4.0, seed=11)
    answers = []
    for share in (True, False):
        engine = make_engine(loaded, share)
        # As generate_choices does: the first choice alone, the second once the first has its first token.
        engine.add_request(choice_request(request, 0, 2))
        outputs: dict[str, list[GenerationOutput]] = {}
        while not outputs:
            for out in engine.step():
                outputs.setdefault(out.request_id, []).append(out)
        hits = engine.blocks.prefix_hits
        engine.add_request(choice_request(request, 1, 2))
        for rid, outs in drain(engine).items():
            outputs.setdefault(rid, []).extend(outs)
        if share:
            assert engine.blocks.prefix_hits - hits == len(contexts)  # every context of choice 2 from the cache
            assert outputs["n2-1"][-1].usage.cached_prompt_tokens >= (len(contexts[0]) - 1) // 16 * 16
        answers.append({rid: tokens_of(outs) for rid, outs in outputs.items()})
        assert engine.blocks.num_used == 0
    assert answers[0] == answers[1]
    assert answers[0]["n2-0"] != answers[0]["n2-1"]  # seeds seed + j: not the same draw twice


def test_a_grammar_gives_the_same_answer_with_sharing_on_and_off(tiny_model):
    loaded = tiny_model("llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema))
    contexts = end_contexts(loaded.tokenizer, ["concise", "formal"])
    request = amulet_request("g", contexts, max_tokens=24, grammar=grammar)
    on, off = run_both(loaded, [request])
    assert on == off
    value = json.loads(loaded.tokenizer.decode(on["g"]).removesuffix(loaded.tokenizer.eos_token or ""))
    assert set(value) == {"n"}


def test_the_cfg_negative_context_gives_the_same_answer_with_sharing_on_and_off(tiny_model):
    """Classifier-free guidance: the conversation as given, and the contrast context carrying the negative sentence."""
    loaded = tiny_model("qwen2")
    contexts = end_contexts(loaded.tokenizer, [], negative="Answer rudely and at length.")
    assert common_prefix(contexts) > 80
    settings = MethodSettings(method=Method.LA, strength=1.5, plausibility=0.0)
    request = amulet_request("cfg", contexts, max_tokens=10, settings=settings)
    on, off = run_both(loaded, [request])
    assert on == off and on["cfg"] == expected(loaded, request)


def test_a_preempted_shared_group_answers_as_an_unpreempted_one(tiny_model):
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    requests = [
        amulet_request(f"p{i}", end_contexts(tok, prefs, turns=TURNS[i:]), max_tokens=24, ignore_eos=True)
        for i, prefs in enumerate([["concise"], ["formal", "uplifting"], ["verbose"]])
    ]
    longest = max(len(c) for r in requests for c in r.contexts)
    small = dict(max_model_len=longest + 32, kv_cache_tokens=2 * (longest + 32), block_size=4, max_num_seqs=12)
    engine = make_engine(loaded, True, **small)
    preempted: list[SequenceGroup] = []
    schedule: Callable[[], StepPlan] = engine.scheduler.schedule

    def spy() -> StepPlan:
        plan = schedule()
        preempted.extend(plan.preempted)
        return plan

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    for r in requests:
        engine.add_request(r)
    squeezed = {rid: tokens_of(outs) for rid, outs in drain(engine).items()}
    assert preempted, "the small KV cache was meant to force preemption"
    assert engine.blocks.num_used == 0
    roomy = make_engine(loaded, True, max_model_len=longest + 32, block_size=4)
    for r in requests:
        roomy.add_request(r)
    alone = {rid: tokens_of(outs) for rid, outs in drain(roomy).items()}
    assert squeezed == alone
    assert alone["p1"] == reference_generate(
        loaded.model,
        requests[1].prompt_ids,
        requests[1].contrast_prompt_ids,
        requests[1].method,
        24,
        extra_prompt_ids=requests[1].extra_prompt_ids,
    )
