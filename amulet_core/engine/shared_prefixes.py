"""Which decode rows read whose leading KV blocks: a request's preference and contrast contexts share the conversation.

With shared-prefix contexts (:mod:`amulet_core.engine.block_manager`) a request's later contexts hold the first
context's blocks for the conversation they share (``Sequence.shared_with_leader`` positions). The paged decode
kernel can then read those blocks once for all of them (:func:`~amulet_core.engine.paged_decode.paged_decode_attention`'s
``followers`` and ``skip``); :func:`shared_prefixes` works out, for a decode step's rows, which ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amulet_core.engine.scheduler import ScheduledChunk

FOLLOWERS = 3
"""Most rows that read a row's leading blocks through its programs (:func:`shared_prefixes`): with a KV head's query
heads padded to 4, a leader and 3 followers fill the tensor cores' 16 rows."""


def shared_prefixes(
    chunks: Sequence[ScheduledChunk], block_size: int, width: int = FOLLOWERS
) -> tuple[list[list[int]], list[int]] | None:
    """For decode ``chunks`` (one new token each; a request's contexts in a row, its first context leading), each
    row's followers (up to ``width``, -1 padded) and the leading positions of each row its leader attends for it:
    its ``Sequence.shared_with_leader`` (whole blocks, checked to be the same ids in both tables, before both rows'
    new tokens); None when no row shares any."""
    followers = [[-1] * width for _ in chunks]
    skip = [0] * len(chunks)
    leader = -1
    for row, chunk in enumerate(chunks):
        seq, shared = chunk.seq, chunk.seq.shared_with_leader
        if not shared:
            leader = row
            continue
        if leader < 0 or -1 not in followers[leader] or shared % block_size:
            continue
        lead = chunks[leader]
        blocks = shared // block_size
        if shared > min(chunk.start, lead.start) or lead.seq.block_table[:blocks] != seq.block_table[:blocks]:
            continue
        followers[leader][followers[leader].index(-1)] = row
        skip[row] = shared
    return (followers, skip) if any(skip) else None
