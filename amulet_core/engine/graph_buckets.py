"""The decode graphs' buckets (batch sizes, context lengths) and the tail's variants captured at start-up."""

from __future__ import annotations

from amulet_core.engine.decode_tail import TailVariant

START_TAIL_VARIANTS = (
    TailVariant(pairs=True, renormalise=True, sampled=False, filtering=False),  # amulet or la, greedy
    TailVariant(pairs=False, renormalise=False, sampled=False, filtering=False),  # base or pref, greedy
    TailVariant(pairs=True, renormalise=True, sampled=True, filtering=False),  # amulet or la, at a temperature
    TailVariant(pairs=False, renormalise=False, sampled=True, filtering=False),  # base or pref, at a temperature
    TailVariant(pairs=True, renormalise=True, sampled=False, filtering=False, grammar=True),  # structured, greedy
    TailVariant(pairs=False, renormalise=False, sampled=False, filtering=False, grammar=True),
    TailVariant(pairs=True, renormalise=True, sampled=True, filtering=False, grammar=True),  # structured, sampled
    TailVariant(pairs=False, renormalise=False, sampled=True, filtering=False, grammar=True),
)
"""The tail's variants :meth:`DecodeGraphs.capture_at_start` captures (within its budget) after the tail-less graphs,
in this order: the common steps (the default plausibility is above 0), then the same with grammar masks (structured
outputs and tool calls: a step with a grammar request). The others are captured on first use."""


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``max_num_seqs``, then ``max_num_seqs`` itself."""
    sizes = {max_num_seqs}
    size = 1
    while size < max_num_seqs:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def context_buckets(block_size: int, max_model_len: int) -> tuple[int, ...]:
    """Whole blocks, doubling from one block up to the first length that holds ``max_model_len`` tokens."""
    top = -(-max_model_len // block_size) * block_size
    sizes = []
    size = block_size
    while size < top:
        sizes.append(size)
        size *= 2
    sizes.append(top)
    return tuple(sizes)


def smallest_at_least(buckets: tuple[int, ...], value: int) -> int | None:
    return next((b for b in buckets if b >= value), None)
