"""Prefix affinity, the decision alone (no Ray): which replica a request's prefix chain should try first.

:class:`AffinityTable` remembers, for each block hash of the chains it was shown, the replica that served
a request holding that block last (a bounded LRU map). :func:`preferred_replica` picks the owner of the
longest matching prefix while it is not busy; a prefix nobody owns goes to the least loaded replica
that caches the fewest blocks, so that different system prompts spread over the replicas. None means
"no preference": the router then falls back to Ray's power of two choices.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

DEFAULT_CAPACITY = 65_536
"""Block hashes remembered (about 1M tokens of distinct prefixes at 16 a block; a few MiB)."""


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one candidate replica."""

    replica: str
    ongoing: int | None
    """Requests running or queued there, as last reported (None: unknown, counted as 0)."""
    capacity: int
    """Its ``max_ongoing_requests``: at that many it takes no more."""

    @property
    def load(self) -> int:
        return self.ongoing or 0


class AffinityTable:
    """Block hash -> the replica that last served a request whose prefix chain held it (least recently
    recorded hashes are evicted past ``capacity``). Used from one event loop (no locking)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()
        self._blocks: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, chain: Sequence[int], among: Collection[str]) -> tuple[str | None, int]:
        """The replica in ``among`` that owns the longest prefix of ``chain``, and that prefix's length in blocks
        (``None, 0`` when no block of it is owned by one of them)."""
        for length in range(len(chain), 0, -1):
            replica = self._owner.get(chain[length - 1])
            if replica is not None and replica in among:
                return replica, length
        return None, 0

    def record(self, chain: Sequence[int], replica: str) -> None:
        """``replica`` served a request with ``chain``: it now owns every block of it."""
        for block in chain:
            previous = self._owner.pop(block, None)
            if previous is not None:
                self._blocks[previous] -= 1
            self._owner[block] = replica
            self._blocks[replica] += 1
        while len(self._owner) > self._capacity:
            _, evicted = self._owner.popitem(last=False)
            self._blocks[evicted] -= 1

    def blocks_of(self, replica: str) -> int:
        """How many remembered blocks ``replica`` owns."""
        return self._blocks[replica]

    def retain(self, replicas: Collection[str]) -> None:
        """Forget every block owned by a replica outside ``replicas`` (gone: stopped, dead or scaled down)."""
        gone = [block for block, replica in self._owner.items() if replica not in replicas]
        for block in gone:
            self._blocks[self._owner.pop(block)] -= 1
        for replica in [r for r in self._blocks if r not in replicas]:
            del self._blocks[replica]


def is_busy(candidate: ReplicaLoad, least_load: int, max_imbalance: int) -> bool:
    """Full, or holding more than ``max_imbalance`` requests above the least loaded candidate."""
    return candidate.load >= candidate.capacity or candidate.load - least_load > max_imbalance


def preferred_replica(
    chain: Sequence[int], candidates: Sequence[ReplicaLoad], table: AffinityTable, max_imbalance: int
) -> str | None:
    """The replica ``chain`` should try first, or None to leave the choice to load balancing alone.

    * The owner of the longest matching prefix (the replica that served it last), unless it is busy.
    * A prefix no candidate owns: among the least loaded candidates that are not full, the one owning the
      fewest blocks (ties: the smallest id, so the choice is deterministic).
    * No chain (no routing key), no candidates, or every candidate full: None.
    """
    if not chain or not candidates:
        return None
    least = min(c.load for c in candidates)
    by_id = {c.replica: c for c in candidates}
    owner, _ = table.owner(chain, by_id)
    if owner is not None:
        return None if is_busy(by_id[owner], least, max_imbalance) else owner
    idle = [c for c in candidates if c.load == least and c.load < c.capacity]
    if not idle:
        return None
    return min(idle, key=lambda c: (table.blocks_of(c.replica), c.replica)).replica
