"""What the Ray tests share: a local Ray cluster with the application deployed, and reading its replicas.

:func:`serve_application` starts Ray on 2 CPUs (this machine's cores; one torch thread per replica, the
ingress, proxy and controller reserve none), deploys ``amulet-ray`` with the given options on a
free port, and tears everything down at the end. Replicas are read through their own metrics ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import psutil

from amulet_ray.application import REPLICA_DEPLOYMENT, build_application, replica_options
from amulet_ray.config import parse_args
from amulet_ray.replica_metrics import PORT_SPAN

APP = "amulet"
FAST_AUTOSCALING_ENV = {
    # Replicas and handles report their queue lengths every half second instead of every 10 s.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
_LABEL = re.compile(r'replica="([^"]+)"')


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive TCP ports on 127.0.0.1 that were all free a moment ago."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size > 65535:
            continue
        taken = False
        for port in range(base, base + size):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise RuntimeError("no block of free ports")


@dataclass(frozen=True)
class ServeApp:
    url: str
    metrics_base: int

    def running_replicas(self) -> int:
        from ray import serve

        deployment = serve.status().applications[APP].deployments[REPLICA_DEPLOYMENT]
        return int(deployment.replica_states.get("RUNNING", 0))

    def replica_ports(self) -> dict[str, int]:
        """Replica id -> the port its metrics answer on (replicas not up yet, or gone, are absent)."""
        found: dict[str, int] = {}
        for port in range(self.metrics_base, self.metrics_base + PORT_SPAN):
            with contextlib.suppress(httpx.TransportError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                match = _LABEL.search(text)
                if match:
                    found[match.group(1)] = port
        return found

    def counter(self, name: str) -> dict[str, float]:
        """Replica id -> the sum of counter ``name`` over its series."""
        totals: dict[str, float] = {}
        for replica, port in self.replica_ports().items():
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
            assert all(f'replica="{replica}"' in line for line in text.splitlines() if line.startswith("amulet_"))
            totals[replica] = sum(values)
        return totals


def pid_listening_on(port: int) -> int:
    """The process listening on 127.0.0.1:``port``."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise LookupError(f"nobody listens on port {port}")


@contextlib.contextmanager
def serve_application(
    argv: Sequence[str],
    autoscaling: Mapping[str, Any] | None = None,
    route_prefix: str = "/",
    environ: Mapping[str, str] | None = None,
) -> Iterator[ServeApp]:
    """Ray on 2 CPUs with ``amulet-ray <argv>`` deployed (``autoscaling``: extra autoscaling options) under
    ``route_prefix`` (``ServeApp.url`` includes it); ``environ``: what the options read instead of the process's."""
    import ray
    from ray import serve

    saved = {key: os.environ.get(key) for key in FAST_AUTOSCALING_ENV}
    os.environ.update(FAST_AUTOSCALING_ENV)  # read by Ray's processes as they start
    port, metrics_base = free_port_block(1), free_port_block(PORT_SPAN)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        configs = parse_args(["--host", "127.0.0.1", "--ray-metrics-port", str(metrics_base), *argv], environ)
        overrides: dict[str, dict[str, Any]] = {}
        if autoscaling:
            derived = replica_options(configs, 0)["autoscaling_config"]
            overrides[REPLICA_DEPLOYMENT] = {"autoscaling_config": {**derived, **autoscaling}}
        serve.run(build_application(configs, overrides, cluster_gpus=0), name=APP, route_prefix=route_prefix)
        yield ServeApp(f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}", metrics_base)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
