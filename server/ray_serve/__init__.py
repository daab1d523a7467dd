"""Scale-out on Ray Serve: N replicas of the same engine + FastAPI app behind Ray's HTTP proxy.

``amulet-server --ray ...`` (or ``serve run docker/ray-serve.yaml``) deploys two Ray Serve deployments:

* ``AmuletIngress`` (:mod:`.deployments`, :mod:`.forwarding`): the HTTP entry behind Ray's proxy. It reads a
  request, computes the hash chain of its rendered pref context's leading token blocks (:mod:`.prefix`) and
  forwards the raw HTTP request, unchanged, to a replica through a Ray deployment handle.
* ``AmuletReplica``: one engine and the very app ``amulet-server`` serves (``server.cli.build_app``), called
  in-process (:mod:`.asgi_bridge`); Ray health-checks it through the app's ``/health`` and ``/ready``, drains it
  at scale-down (:mod:`.health`), and serves its ``amulet_`` metrics on a port of its own (:mod:`.replica_metrics`).

Requests are routed by :class:`.router.PrefixAffinityRouter`, a Ray Serve request router: the replica that
last served the longest matching prefix, unless it is busy (then Ray's power of two choices).

Ray is imported by :mod:`.router`, :mod:`.deployments`, :mod:`.application` and :mod:`.launcher` (inside
:func:`~.launcher.serve_on_ray`) only; ``server.cli`` imports :mod:`.config` alone, and the launcher only
with ``--ray``, so ``amulet-server`` imports and runs without Ray installed. The other modules (the
config, the prefix key, the affinity decision, the ASGI bridge, the ingress app, the health check, the replica metrics)
need no Ray and are tested without a cluster.
"""
