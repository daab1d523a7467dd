"""Continuous batching: which tokens of which sequences go into the next forward pass.

Pure Python over :class:`Sequence` and :class:`BlockManager`; no tensors. A request is a
group of sequences (its K preference contexts, then its contrast context for la and amulet:
one to K + 1) that are always scheduled together, because its next token needs the logits of
all of them from the same step. Each sequence after the first shares the leading full blocks its
tokens have in common with the first one (the leader): they are allocated and prefilled once, by
the leader, and the sequence prefills only the rest of its prompt, never before the leader has
computed the shared blocks (in the same forward pass at the earliest: a pass writes every new
token's KV before any attention reads the cache). Within one step a
group's sequences either all reach their last token (the group is *sampled*) or they only
prefill chunks that stop short of their last token. Running groups go first (decode never
starves), then waiting groups are admitted while sequences, tokens and KV blocks allow.
When KV blocks run out, the newest running group is preempted: its blocks are freed and it
waits to be prefilled again (mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from amulet_core.engine.block_manager import BlockManager
from amulet_core.engine.sequence import Sequence


@dataclass(eq=False)
class SequenceGroup:
    """The scheduler's view of one request."""

    request_id: str
    seqs: list[Sequence]

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``seq.token_ids[start:start + num_tokens]`` at positions ``start...``."""

    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    sampled: list[SequenceGroup] = field(default_factory=list)
    """Groups whose every sequence reaches its last token this step: the logits to keep."""
    preempted: list[SequenceGroup] = field(default_factory=list)
    admitted: list[SequenceGroup] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []

    # ---- membership ---------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def remove(self, group: SequenceGroup) -> None:
        """Drop a finished or aborted group and free its KV blocks now."""
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        for seq in group.seqs:
            if seq.block_table:
                self.blocks.free(seq)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(g.seqs) for g in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -----------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # Groups at their last token (decoding) first, so that prefill chunks never starve them.
        order = sorted(self.running, key=lambda g: any(s.num_uncomputed > 1 for s in g.seqs))
        for group in order:
            if group not in self.running:  # preempted below while making room for an older group
                continue
            if not self._make_room(group, plan):
                continue
            budget -= self._plan_group(group, budget, plan)
        while self.waiting and budget > 0:
            group = self.waiting[0]
            if self.num_running_seqs + len(group.seqs) > self.max_num_seqs:
                break
            if not self.blocks.can_allocate(group.seqs):
                break
            self.waiting.popleft()
            self.blocks.allocate(group.seqs)
            self.running.append(group)
            plan.admitted.append(group)
            budget -= self._plan_group(group, budget, plan)
        return plan

    def _make_room(self, group: SequenceGroup, plan: StepPlan) -> bool:
        """Grow the group's block tables for its next tokens, preempting newer groups if needed."""
        while True:
            needed = sum(max(0, self.blocks.blocks_needed(len(s.token_ids)) - len(s.block_table)) for s in group.seqs)
            if needed <= self.blocks.num_free:
                for seq in group.seqs:
                    self.blocks.ensure_capacity(seq, len(seq.token_ids))
                return True
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is group:
                return False

    def _preempt(self, group: SequenceGroup, plan: StepPlan) -> None:
        self.running.remove(group)
        for seq in group.seqs:
            self.blocks.free(seq)
        self.waiting.appendleft(group)
        plan.preempted.append(group)

    def _plan_group(self, group: SequenceGroup, budget: int, plan: StepPlan) -> int:
        """Add the group's chunks within ``budget``; return the tokens used."""
        remaining = [s.num_uncomputed for s in group.seqs]
        if sum(remaining) <= budget:
            for seq, n in zip(group.seqs, remaining, strict=True):
                if n:
                    plan.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            plan.sampled.append(group)
            return sum(remaining)
        used = 0
        leader_end = group.leader.num_computed
        for i, (seq, n) in enumerate(zip(group.seqs, remaining, strict=True)):
            take = min(n - 1, budget - used)
            if i > 0 and leader_end < seq.shared_with_leader:
                take = 0  # the leader has not computed its shared blocks yet, even counting this step
            if take > 0:
                plan.chunks.append(ScheduledChunk(seq, seq.num_computed, take))
                used += take
            if i == 0:
                leader_end = seq.num_computed + max(take, 0)
        return used

    def complete_step(self, plan: StepPlan) -> None:
        """Mark the planned tokens computed and publish newly full blocks to the prefix cache."""
        for chunk in plan.chunks:
            if not chunk.seq.block_table:
                continue  # freed since it was planned (its request finished or was aborted): nothing to publish
            chunk.seq.num_computed += chunk.num_tokens
            self.blocks.register_computed(chunk.seq)
