"""A packed forward pass's inputs on the device, from the step's scheduled chunks (the eager path; a decode-only step
that the decode graphs replay sets their static inputs instead: :mod:`amulet_core.engine.decode_graphs`).

Single-token (decode) chunks are packed first, then the prefill chunks. Token ids, positions and cache slots are
built as flat Python lists and copied to the device once each; the attention's view of the step
(:class:`~amulet_core.engine.paged_attention.PackedBatch`) is the paged kernels' groups, the batch-invariant plan
(deterministic), or the SDPA spans with their gathered contexts. A sequence's last token may be
:data:`~amulet_core.engine.overlap.PENDING_TOKEN`, sampled by the step still in flight: it is taken from the pending
step's device tensor, on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import to_device
from amulet_core.engine.fixed_order_kernel import FixedOrderAttention
from amulet_core.engine.invariant_attention import step_plan
from amulet_core.engine.overlap import PendingTokens, fill_pending
from amulet_core.engine.paged_attention import (
    DecodeGroup,
    PackedBatch,
    PagedKVCache,
    PrefillGroup,
    SequenceSpan,
    causal_mask,
    decode_group,
    padded_block_tables,
)
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence
from amulet_core.engine.shared_prefixes import shared_prefixes


@dataclass(frozen=True)
class StepInputs:
    """Builds the inputs of a packed step over ``cache`` on ``device``: for the paged kernels (``paged_kernel``), the
    batch-invariant attention (``deterministic``) or SDPA."""

    cache: PagedKVCache
    device: torch.device
    paged_kernel: bool
    deterministic: bool
    attention_kernel: FixedOrderAttention | None = None
    """The batch-invariant attention's compiled kernel (None: its torch operations)."""

    def build(
        self,
        decode_chunks: list[ScheduledChunk],
        prefill_chunks: list[ScheduledChunk],
        logits_for: list[Sequence],
        pending: PendingTokens | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch]:
        """Token ids and positions ``[N]``, the packed indices whose logits are kept (each of ``logits_for``'s last
        scheduled token, in that order) and the attention's batch."""
        bs = self.cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        spans: list[SequenceSpan] = []
        last_index: dict[int, int] = {}
        for chunk in decode_chunks:
            seq, p = chunk.seq, chunk.start
            last_index[id(seq)] = len(input_ids)
            input_ids.append(seq.token_ids[p])
            positions.append(p)
            slot_mapping.append(seq.block_table[p // bs] * bs + p % bs)
        for chunk in prefill_chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            last_index[id(seq)] = offset + n - 1
            if self.paged_kernel:  # the kernel reads the context through the block table
                slot_mapping.extend(self._slot_list(seq, start, end))
                continue
            context = self._slot_list(seq, 0, end)
            slot_mapping.extend(context[start:])
            mask = None if self.deterministic else causal_mask(n, end, self.device)
            spans.append(SequenceSpan(offset, offset + n, self._tensor(context), mask))
        slots = self._tensor(slot_mapping)
        if self.paged_kernel:
            prefill = self._prefill_group(prefill_chunks, len(decode_chunks))
            batch = PackedBatch(self.cache, slots, (), self._decode_group(decode_chunks), prefill=prefill)
        elif self.deterministic:
            tables, lengths = [c.seq.block_table for c in decode_chunks], [c.start + 1 for c in decode_chunks]
            contexts = [(s.query_start, s.query_end, s.context_slots) for s in spans]
            plan = step_plan(tables, lengths, contexts, bs, self.device, self.attention_kernel)
            batch = PackedBatch(self.cache, slots, (), invariant=plan)
        else:
            batch = PackedBatch(self.cache, slots, tuple(spans), self._decode_group(decode_chunks))
        keep = self._tensor([last_index[id(seq)] for seq in logits_for])
        ids = self._tensor(input_ids)
        if pending is not None:
            fill_pending(ids, input_ids, decode_chunks + prefill_chunks, pending)
        return ids, self._tensor(positions), keep, batch

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A flat Python list of ints on the device, in one copy."""
        return to_device(values, self.device, torch.long)

    def _slot_list(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 of a sequence, as a Python list."""
        bs, table = self.cache.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _decode_group(self, decode_chunks: list[ScheduledChunk]) -> DecodeGroup | None:
        """The decode sequences' contexts as slots, computed on the device from their block tables.

        Block tables are lists that the block manager grows in place; a step only copies them, padded
        to the longest, in one tensor, with the context lengths in another.
        """
        if not decode_chunks:
            return None
        lengths = [c.start + 1 for c in decode_chunks]
        max_len = max(lengths)
        blocks = -(-max_len // self.cache.block_size)
        tables = padded_block_tables((c.seq.block_table for c in decode_chunks), blocks, 0)  # padding is masked
        padded = min(lengths) != max_len
        shared = shared_prefixes(decode_chunks, self.cache.block_size) if self.paged_kernel else None
        return decode_group(
            self._tensor(tables).view(len(decode_chunks), blocks),
            self._tensor(lengths) if padded or self.paged_kernel else None,
            self.cache.block_size,
            max_len,
            self.paged_kernel,
            None if shared is None else (to_device(shared[0], self.device, torch.long), self._tensor(shared[1])),
        )

    def _prefill_group(self, prefill_chunks: list[ScheduledChunk], first: int) -> PrefillGroup | None:
        """The prefill chunks for the paged prefill kernel, packed from token ``first`` on: their block tables
        (padded to the longest) and their starts, counts and context lengths, one copy each."""
        if not prefill_chunks:
            return None
        ends = [c.start + c.num_tokens for c in prefill_chunks]
        blocks = -(-max(ends) // self.cache.block_size)
        tables = padded_block_tables((c.seq.block_table for c in prefill_chunks), blocks, 0)  # padding is never read
        counts = [c.num_tokens for c in prefill_chunks]
        starts = [0, *itertools.accumulate(counts[:-1])]
        return PrefillGroup(
            first,
            self._tensor(tables).view(len(prefill_chunks), blocks),
            self._tensor(starts),
            self._tensor(counts),
            self._tensor(ends),
            max(counts),
        )
