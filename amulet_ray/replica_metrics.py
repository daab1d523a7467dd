"""Each replica's ``amulet_`` metrics on a port of its own, every series labelled ``replica="<Ray replica id>"``.

Behind Ray's proxy, ``/metrics`` would reach one replica picked at random, so a replica serves its own:
:class:`ReplicaMetricsServer` listens on ``host:base_port + local_rank`` (the replica's rank on its node;
the next free port of the :data:`PORT_SPAN` above it when that one is taken, e.g. while a stopping replica
still holds it) and answers ``GET /metrics`` with the app's own ``/metrics`` (called in-process, the same
route ``amulet-server`` serves) plus the ``replica`` label. Prometheus scrapes ``base_port ..
base_port + replicas per node - 1`` on each node (see ``docker/prometheus-ray.yml``). No Ray here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

PORT_SPAN = 16
"""Ports tried above a replica's own (base + local rank) when it is taken."""
REPLICA_LABEL = "replica"


def with_replica_label(exposition: str, replica: str) -> bytes:
    """Prometheus text ``exposition`` with ``replica="<replica>"`` added to every sample."""

    class Relabelled:
        def collect(self) -> Iterator[Metric]:
            for family in text_string_to_metric_families(exposition):
                family.samples = [s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples]
                yield family

    return generate_latest(Relabelled())


def bind_metrics_socket(host: str, base_port: int, local_rank: int) -> socket.socket:
    """A listening socket on ``base_port + local_rank``, or the next free one of :data:`PORT_SPAN` ports above.

    Raises OSError when none is free."""
    first = base_port + local_rank
    for port in range(first, min(first + PORT_SPAN, 65536)):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        sock.listen(16)
        return sock
    raise OSError(errno.EADDRINUSE, f"no free port for the replica's metrics in {first}..{first + PORT_SPAN - 1}")


class ReplicaMetricsServer:
    """``GET /metrics`` of one replica on its own socket, served by uvicorn on the replica's event loop.

    ``render`` returns the app's Prometheus text (``/metrics`` called in-process)."""

    def __init__(self, render: Callable[[], Awaitable[str]], replica: str, sock: socket.socket) -> None:
        self._render = render
        self._replica = replica
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi, log_level="warning", lifespan="off", access_log=False, interface="asgi3", server_header=False
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Future[None] | None = None

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            status, body, content_type = 404, b"Not found: this port serves GET /metrics only.\n", "text/plain"
        else:
            status, content_type = 200, CONTENT_TYPE_LATEST
            body = with_replica_label(await self._render(), self._replica)
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})

    def start(self) -> ReplicaMetricsServer:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
        return self

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except Exception:
                logger.warning("The replica's metrics server did not stop cleanly", exc_info=True)
        self._sock.close()
