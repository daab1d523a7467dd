"""Paged KV blocks with a prefix cache keyed by a hash chain over full blocks of tokens.

Pure Python: no tensors. A block holds ``block_size`` token positions of KV in the cache
pool. A full block whose KV has been computed is registered under a BLAKE2b hash of (the
previous block's hash, its tokens); a later sequence whose leading blocks hash the same
reuses them instead of prefilling again. Freed blocks keep their contents and stay findable
until they are handed out again (least recently freed first).

Tenants: the chain of a sequence with a ``cache_salt`` starts from a hash of the salt instead of
nothing, so its blocks are found only by sequences of the same salt (and a hit, the
``cached_tokens`` a caller sees, never reveals another salt's prompts). The hash is a cryptographic
one rather than Python's ``hash``, so a caller cannot craft token blocks whose chain
collides with another tenant's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from amulet_core.engine.sequence import Sequence

HASH_BYTES = 16


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), "little")


def chain_root(cache_salt: str | None) -> int | None:
    """The hash a sequence's chain starts from: none for the unsalted cache, else the salt's (domain-separated,
    so no salt's root equals a block's hash)."""
    return None if cache_salt is None else _digest(b"salt\0" + cache_salt.encode("utf-8", "surrogatepass"))


def block_hash(previous: int | None, tokens: Seq[int]) -> int:
    """The hash of a full block of ``tokens`` following the block (or root) hashed ``previous``."""
    head = b"none" if previous is None else previous.to_bytes(HASH_BYTES, "little")
    return _digest(b"block\0" + head + array("q", tokens).tobytes())


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = field(default=())


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True, share_context_prefix: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.share_context_prefix = share_context_prefix
        """Whether a request's later contexts share the full blocks they have in common with its first one
        (allocated once, prefilled once by the first context). Off only to compare against (tests)."""
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order; cached (hashed) free blocks are still reusable.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix lookup ----------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the leading full blocks of ``seq``'s tokens found in the cache under its salt.

        The last prompt token is never served from cache: its logits are needed.
        """
        if not self.enable_prefix_cache:
            return []
        tokens = seq.token_ids
        found: list[int] = []
        previous = chain_root(seq.cache_salt)
        usable = (len(tokens) - 1) // self.block_size
        for i in range(usable):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(previous, chunk)
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            found.append(block_id)
            previous = h
        return found

    def _shared_with(self, tokens: Seq[int], leader: Sequence) -> int:
        """Full blocks at the start of ``tokens`` equal to the leader's (same request, other context).

        The last token of either is never shared: its logits are needed, so each context computes it."""
        if not self.share_context_prefix:
            return 0
        limit = min(len(tokens) - 1, len(leader.token_ids) - 1) // self.block_size
        n = 0
        while n < limit:
            lo, hi = n * self.block_size, (n + 1) * self.block_size
            if tuple(tokens[lo:hi]) != tuple(leader.token_ids[lo:hi]):
                break
            n += 1
        return n

    def can_allocate(self, seqs: Seq[Sequence]) -> bool:
        """Whether all of a request's sequences fit now.

        Conservative: only blocks already in use by others (or shared within the request)
        count as free of charge; a cached block sitting in the free list is counted as a cost.
        """
        needed = 0
        leader: Sequence | None = None
        for seq in seqs:
            cached = self._cached_prefix(seq)
            in_use = sum(1 for b in cached if self.blocks[b].ref_count > 0)
            shared = self._shared_with(seq.token_ids, leader) if leader is not None else 0
            needed += self.blocks_needed(len(seq.token_ids) + 1) - max(in_use, shared)
            leader = leader or seq
        return needed <= self.num_free

    def allocate(self, seqs: Seq[Sequence]) -> None:
        """Give every sequence of one request its blocks, reusing cached and shared leading blocks."""
        leader: Sequence | None = None
        for seq in seqs:
            if seq.block_table:
                raise RuntimeError("sequence already has blocks")
            cached = self._cached_prefix(seq)
            shared = self._shared_with(seq.token_ids, leader) if leader is not None else 0
            self.prefix_queries += 1
            if cached and len(cached) >= shared:
                self.prefix_hits += 1
                for block_id in cached:
                    self._take(block_id)
                seq.block_table.extend(cached)
                seq.num_computed = len(cached) * self.block_size
                seq.num_cached_prompt = seq.num_computed
            elif shared and leader is not None:
                # The leader computes these blocks no later than this sequence reads them (the scheduler
                # holds this sequence back until then); the first ``len(cached)`` of them are the leader's
                # own prefix-cache hit, already computed, so the cache serves this context too.
                if cached:
                    self.prefix_hits += 1
                    seq.num_cached_prompt = len(cached) * self.block_size
                for block_id in leader.block_table[:shared]:
                    self._take(block_id)
                seq.block_table.extend(leader.block_table[:shared])
                seq.num_computed = shared * self.block_size
                seq.shared_with_leader = seq.num_computed
            need = self.blocks_needed(len(seq.token_ids) + 1) - len(seq.block_table)
            for _ in range(need):
                seq.block_table.append(self._take_free())
            leader = leader or seq

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)
        block.ref_count += 1

    def _take_free(self) -> int:
        if not self._free:
            raise RuntimeError("out of KV blocks")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    # ---- growth and release -----------------------------------------------------------
    def ensure_capacity(self, seq: Sequence, num_positions: int) -> None:
        """Make sure the block table covers ``num_positions`` token positions."""
        while len(seq.block_table) * self.block_size < num_positions:
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks to the prefix cache."""
        if not self.enable_prefix_cache:
            return
        full = seq.num_computed // self.block_size
        while seq.num_hashed < full:
            i = seq.num_hashed
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            previous = seq.last_hash if i else chain_root(seq.cache_salt)
            h = block_hash(previous, chunk)
            if block.hash is None:
                block.hash, block.tokens = h, chunk
                self._by_hash.setdefault(h, block.block_id)
            seq.last_hash = h
            seq.num_hashed += 1

    def free(self, seq: Sequence) -> None:
        # Release the tail first so that, among freed blocks, a prefix's head is evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)  # plain blocks are reused first
        seq.block_table.clear()
        seq.reset_cache_state()
