"""``PrefixAffinityRouter``: a Ray Serve request router (``ray.serve.request_router.RequestRouter``) for replicas.

Ray Serve runs one router per deployment handle, in the process that holds the handle: here the ingress.
Each request to ``AmuletReplica.forward`` carries a :class:`~amulet_ray.asgi_bridge.ForwardedRequest`
whose ``prefix_chain`` (see :mod:`amulet_ray.prefix`) is the routing key. ``choose_replicas`` ranks
the preferred replica (:func:`~amulet_ray.affinity.preferred_replica`: the one that served the longest
matching prefix last, unless busy) first and Ray's power-of-two-choices pair second, so a preferred replica
that turns out full falls through to load balancing. A request without a chain (``--ray-routing pow2``,
the ``x-amulet-routing: pow2`` header, or one the ingress could not render) gets the pair alone.

Ray's ``PrefixCacheAffinityRouter`` (``ray.serve.llm``) is not used: it matches the raw message text rather
than the rendered pref context the engine caches, keeps its prefix tree in a separate actor that it calls with
blocking ``ray.get`` from the routing loop, and by default never falls back to load balancing. What is reused
is Ray's router API, its power-of-two-choices step, its queue-length cache and its rejection protocol.

Queue lengths come from Ray's own cache of them (the replicas report theirs with each accepted request);
Ray probes a replica whose length is unknown before sending it anything. The table learns in
``on_request_routed`` (called once a replica accepted a request) and forgets dead or removed replicas.
"""

from __future__ import annotations

from typing import Any, cast

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from amulet_ray.affinity import DEFAULT_CAPACITY, AffinityTable, ReplicaLoad, preferred_replica


def chain_of(pending_request: PendingRequest | None) -> tuple[int, ...]:
    """The prefix chain a request carries (its first argument's ``prefix_chain``), or () for none."""
    if pending_request is None or not pending_request.args:
        return ()
    chain = getattr(pending_request.args[0], "prefix_chain", ())
    return tuple(chain) if isinstance(chain, tuple) else ()


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Prefix affinity first, Ray's power of two choices when the preferred replica is busy or unknown.

    ``request_router_kwargs``: ``max_imbalance`` (requests above the least loaded replica at which the
    preferred one counts as busy) and ``capacity`` (block hashes remembered).
    """

    def initialize_state(self, max_imbalance: int = 8, capacity: int = DEFAULT_CAPACITY, **kwargs: Any) -> None:
        self._table = AffinityTable(capacity)
        self._max_imbalance = max_imbalance

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        ongoing = self._replica_queue_len_cache.get(replica.replica_id)
        return ReplicaLoad(replica.replica_id.unique_id, ongoing, replica.max_ongoing_requests)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        # Ray's own pair (it also applies locality and model multiplexing); not a subclass of it, whose FIFO
        # mixin may hand the replica chosen for this request to an older one of another prefix.
        balanced: list[list[RunningReplica]] = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            cast(Any, self), candidate_replicas=candidate_replicas, pending_request=pending_request
        )
        chain = chain_of(pending_request)
        if not chain or not balanced:
            return balanced
        loads = [self._load(r) for r in candidate_replicas]
        chosen = preferred_replica(chain, loads, self._table, self._max_imbalance)
        if chosen is None:
            return balanced
        first = next(r for r in candidate_replicas if r.replica_id.unique_id == chosen)
        return [[first], *balanced]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        chain = chain_of(pending_request)
        if chain:
            self._table.record(chain, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.retain({r.unique_id for r in self._replica_id_set if r != replica_id})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._table.retain({r.replica_id.unique_id for r in replicas})
