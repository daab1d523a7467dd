"""Scale-out on Ray Serve: N replicas of the same engine + FastAPI app behind Ray's HTTP proxy.

``amulet-ray ...`` (its own console script, :mod:`.cli`; ``amulet-server --ray ...`` hands its command line
over to it; or ``serve run docker/ray-serve.yaml``) deploys two Ray Serve deployments:

* ``AmuletIngress`` (:mod:`.deployments`, :mod:`.forwarding`): the HTTP entry behind Ray's proxy. It reads a
  request, computes the hash chain of its rendered pref context's leading token blocks (:mod:`.prefix`) and
  forwards the raw HTTP request, unchanged, to a replica through a Ray deployment handle.
* ``AmuletReplica``: one engine and the very app ``amulet-server`` serves (``server.assembly.build_app``), called
  in-process (:mod:`.asgi_bridge`); Ray health-checks it through the app's ``/health`` and ``/ready``, drains it
  at scale-down (:mod:`.health`), and serves its ``amulet_`` metrics on a port of its own (:mod:`.replica_metrics`).

Requests are routed by :class:`.router.PrefixAffinityRouter`, a Ray Serve request router: the replica that
last served the longest matching prefix, unless it is busy (then Ray's power of two choices).

This package sits on top of ``server`` (it imports the server's options, app assembly and serving code; the
server imports nothing of it but ``server.cli``'s lazy hand-over of ``--ray``). Ray is imported by
:mod:`.router`, :mod:`.deployments`, :mod:`.application` and :mod:`.launcher` (inside
:func:`~.launcher.serve_on_ray`) only, so ``amulet-server`` imports and runs without Ray installed, and
``amulet-ray`` without it says how to install it. The other modules (the options and config, the prefix
key, the affinity decision, the ASGI bridge, the ingress app, the health check, the replica metrics) need no
Ray and are tested without a cluster.
"""
