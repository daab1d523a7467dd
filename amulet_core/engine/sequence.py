"""A sequence is one context of a request (a preference context or the contrast one): its tokens and its KV blocks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    """Token ids (prompt, then generated) and where their KV lives.

    ``num_computed`` counts leading tokens whose KV is in the cache. Generated tokens are
    appended to every sequence of a request, so all its contexts grow together.
    """

    token_ids: list[int]
    num_prompt_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt: int = 0
    """Prompt tokens served from the prefix cache at admission, directly or through the first context's blocks
    it shares (for usage and metrics)."""
    shared_with_leader: int = 0
    """Leading tokens whose blocks this sequence shares with the request's first context, which computes them:
    this sequence counts them computed and reads them no earlier than the pass that writes them."""
    num_hashed: int = 0
    last_hash: int | None = None
    cache_salt: str | None = None
    """The tenant's salt: mixed into the first block's prefix-cache hash, so only sequences of the same salt share
    cached blocks (None: the unsalted cache)."""

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def reset_cache_state(self) -> None:
        """Forget all KV bookkeeping (blocks freed, e.g. on preemption or finish)."""
        self.num_computed = 0
        self.shared_with_leader = 0
        self.num_hashed = 0
        self.last_hash = None
