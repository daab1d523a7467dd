"""The two Ray Serve deployment classes; :mod:`amulet_ray.application` turns them into an application.

``AmuletReplica``: one engine and ``amulet-server``'s app (``server.assembly.build_app``), served in-process:

* start-up runs the app's lifespan (the engine starts and loads the model) and returns once the model is
  loaded; a model that fails to load fails the replica's start (Ray retries, then reports the deployment
  failed). With ``--wait-for-model`` the replica stays up instead and its health check fails until then.
* ``forward`` answers one :class:`~amulet_ray.asgi_bridge.ForwardedRequest` (a streaming call), with
  the ``x-amulet-replica`` header naming the replica.
* ``check_health`` (Ray calls it every ``health_check_period_s``) asks the app's ``/health`` and ``/ready``:
  a stalled or dead engine (``/health`` 503) or an app that is not ready makes Ray replace the replica.
* On scale-down or shutdown Ray stops routing to the replica and waits (``graceful_shutdown_timeout_s``,
  from ``--drain-timeout``) for its running requests, then ``__del__`` runs the server's own drain
  (``server.draining.drainer``: refuse new calls with 503, abort what still runs with an error event,
  stop the engine) and the app's shutdown.

``AmuletIngress``: the HTTP entry behind Ray's proxy (:class:`~amulet_ray.forwarding.ForwardingApp`).
It loads the model's tokenizer (no weights) to key requests by prefix; where it cannot, it logs a warning
and every request is balanced by Ray's power of two choices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message

from amulet_ray.asgi_bridge import AsgiLifespan, ForwardedRequest, call_app, get
from amulet_ray.config import REPLICA_HEADER, ROUTING_PREFIX
from amulet_ray.forwarding import ForwardingApp, ingress_app
from amulet_ray.health import check_app_health
from amulet_ray.prefix import PrefixKeyer
from amulet_ray.replica_metrics import ReplicaMetricsServer, bind_metrics_socket
from server.assembly import build_app
from server.draining import drainer
from server.options import LOG_FORMAT, Configs

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.1
DEL_DRAIN_S = 2.0
"""``__del__``'s own wait for requests: Ray has already waited ``graceful_shutdown_timeout_s`` for them."""


def configure_logging(level: str) -> None:
    """The server's loggers at ``--log-level`` in a Ray worker (Ray keeps the worker's stderr in its logs)."""
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper(), logging.INFO)
    for name in ("server", "amulet_core", "amulet_ray"):
        logging.getLogger(name).setLevel(numeric)
    if not logging.getLogger().handlers:
        logging.basicConfig(format=LOG_FORMAT)


class AmuletReplica:
    """One engine + the FastAPI app (see the module docstring)."""

    async def __init__(self, configs: Configs, metrics_port: int) -> None:  # type: ignore[misc]  # Ray awaits it
        configure_logging(configs.server.log_level)
        self._metrics: ReplicaMetricsServer | None = None
        self._app = build_app(configs)
        self._lifespan = AsgiLifespan(self._app)
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        self._header = ((REPLICA_HEADER.encode(), self.replica.encode()),)
        await self._lifespan.startup()
        engine = self._app.state.engine
        started = time.monotonic()
        while not engine.load_finished:
            await asyncio.sleep(LOAD_POLL_S)
        if engine.load_error is not None and not configs.wait_for_model:
            await self._lifespan.shutdown()
            raise RuntimeError(f"The model failed to load: {type(engine.load_error).__name__}: {engine.load_error}")
        logger.info("Replica %s loaded the model in %.1f s", self.replica, time.monotonic() - started)
        if metrics_port:
            self._serve_metrics(configs.server.host, metrics_port, context.rank.local_rank)

    def _serve_metrics(self, host: str, base_port: int, local_rank: int) -> None:
        """Serve this replica's metrics on its own port; without a free port it serves on, unmeasured (logged)."""
        try:
            sock = bind_metrics_socket(host, base_port, local_rank)
        except OSError as exc:
            logger.warning("Replica %s serves no metrics: %s", self.replica, exc)
            return
        self._metrics = ReplicaMetricsServer(self._render_metrics, self.replica, sock).start()
        logger.info("Replica %s serves its metrics at http://%s:%d/metrics", self.replica, host, self._metrics.port)

    async def _render_metrics(self) -> str:
        status, body = await get(self._app, "/metrics", self._lifespan.state)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
        """The app's answer to ``request``, as batches of ASGI messages (call it with ``stream=True``)."""
        async for batch in call_app(self._app, request, self._header, self._lifespan.state):
            yield batch

    async def check_health(self) -> None:
        """Raise (Ray then replaces this replica) when the engine failed or the app is not ready."""
        await check_app_health(self._app, self._lifespan.state)

    async def __del__(self) -> None:
        """Ray's graceful shutdown: the server's drain, then the app's shutdown (see the module docstring)."""
        try:
            await drainer(self._app.state.lifecycle, self._app.state.engine, DEL_DRAIN_S)()
            await self._lifespan.shutdown()
        finally:
            if self._metrics is not None:
                await self._metrics.stop()


@serve.ingress()
class AmuletIngress:
    """The HTTP entry: keys each request by its prefix and forwards it to an ``AmuletReplica``."""

    def __init__(self, replicas: DeploymentHandle, configs: Configs, routing: str) -> None:
        configure_logging(configs.server.log_level)
        self._configs = configs
        self._routing = routing
        self._replicas = replicas.options(method_name="forward", stream=True)
        # Without prefix routing nothing needs the tokenizer (a request's header cannot ask for it then).
        self._keyer = self._load_keyer(configs) if routing == ROUTING_PREFIX else None

    @staticmethod
    def _load_keyer(configs: Configs) -> PrefixKeyer | None:
        """The prefix keyer, or None (power of two choices for every request) when this node cannot load the
        model's tokenizer, e.g. a head node without the model's files: routing degrades, serving goes on."""
        try:
            return PrefixKeyer.load(configs)
        except Exception as exc:
            logger.warning("Prefix routing is off: the tokenizer did not load here (%s: %s)", type(exc).__name__, exc)
            return None

    def _call_replica(self, request: ForwardedRequest) -> Any:
        return self._replicas.remote(request)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        server = self._configs.server
        forwarding = ForwardingApp(self._call_replica, self._keyer, self._routing, server.retry_after_s)
        return ingress_app(forwarding, server)
