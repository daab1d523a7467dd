"""Scheduling and KV block accounting, in pure Python (no tensors, no model)."""

from __future__ import annotations

from amulet_core.engine.block_manager import BlockManager
from amulet_core.engine.scheduler import Scheduler, SequenceGroup
from amulet_core.engine.sequence import Sequence

BS = 4


def group(rid: str, *prompts: list[int]) -> SequenceGroup:
    return SequenceGroup(rid, [Sequence(list(p)) for p in prompts])


def run_step(s: Scheduler):
    plan = s.schedule()
    s.complete_step(plan)
    for g in plan.sampled:  # pretend a token was chosen
        for seq in g.seqs:
            seq.token_ids.append(7)
    return plan


def test_request_pair_is_sampled_together_and_shares_leading_blocks():
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    common = list(range(100, 112))  # 3 full blocks
    g = group("a", common + [1, 2, 3, 4, 5], common + [9])
    s.add(g)
    plan = run_step(s)
    assert plan.sampled == [g]
    pref, base = g.seqs
    assert base.block_table[:3] == pref.block_table[:3]
    assert base.shared_with_leader == 12
    # The base context only prefilled its own tail.
    assert {c.seq: c.num_tokens for c in plan.chunks} == {pref: 17, base: 1}
    # Then one token per sequence per step.
    plan = run_step(s)
    assert sorted(c.num_tokens for c in plan.chunks) == [1, 1]


def test_chunked_prefill_never_samples_half_a_pair():
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    g = group("a", list(range(30)), list(range(50, 70)))
    s.add(g)
    sampled_at = []
    for i in range(6):
        plan = run_step(s)
        assert plan.num_tokens <= 16
        if plan.sampled:
            sampled_at.append(i)
            # Both contexts reach their last token in the same step.
            assert all(seq.num_computed == len(seq.token_ids) - 1 for seq in g.seqs)
    assert sampled_at and sampled_at[0] >= 2


def test_prefix_cache_hit_across_requests():
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(200, 216))  # 4 full blocks
    first = group("a", system + [1, 2])
    s.add(first)
    run_step(s)
    s.remove(first)
    assert bm.num_used == 0
    second = group("b", system + [3, 4, 5])
    s.add(second)
    plan = run_step(s)
    assert second.leader.num_cached_prompt == 16
    assert [c.num_tokens for c in plan.chunks] == [3]
    assert bm.prefix_hits == 1 and bm.prefix_queries == 2


def test_limits_make_requests_wait_and_decoding_goes_first():
    bm = BlockManager(64, BS)
    s = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=64)
    a, b = group("a", [1, 2, 3], [4, 5]), group("b", [6, 7], [8, 9])
    s.add(a)
    s.add(b)
    plan = run_step(s)
    assert plan.sampled == [a] and list(s.waiting) == [b]  # 2 + 2 sequences > max_num_seqs
    s.remove(a)
    plan = run_step(s)
    assert plan.sampled == [b]


def test_out_of_blocks_preempts_newest_and_frees_everything_on_remove():
    bm = BlockManager(6, BS)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = group("a", list(range(7))), group("b", list(range(10, 17)))
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.running == [a, b] and bm.num_free == 2
    preempted = []
    for _ in range(12):
        plan = run_step(s)
        preempted += plan.preempted
    assert b in preempted and a in s.running
    s.remove(a)
    s.remove(b)
    assert bm.num_used == 0 and not s.has_work()


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, BS)
    seq = Sequence(list(range(9)))
    bm.allocate([seq])
    seq.num_computed = 8
    bm.register_computed(seq)
    bm.free(seq)
    again = Sequence(list(range(9)))
    assert bm.can_allocate([again])
    bm.allocate([again])
    assert again.num_computed == 8
    bm.free(again)
    other = Sequence(list(range(50, 63)))  # needs all 4 blocks: evicts the cached ones
    bm.allocate([other])
    third = Sequence(list(range(9)))
    bm.free(other)
    bm.allocate([third])
    assert third.num_computed == 0
