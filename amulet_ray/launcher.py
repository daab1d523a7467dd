"""``amulet-ray`` (and ``amulet-server --ray``): deploy the application on a Ray cluster, serve until a signal,
then tear it down.

Exit statuses as in :mod:`server.supervision`: 0 after a signal (the replicas drained), 2 when Ray Serve is
not installed, 3 when Ray or the application could not start (the reason is logged: a replica whose model
fails to load fails the deployment after Ray's retries).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from amulet_ray.config import INSTALL_HINT, RayConfigs
from server.supervision import EXIT_STARTUP_FAILED, EXIT_USAGE

logger = logging.getLogger(__name__)

WAIT_TICK_S = 1.0


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT; a second one exits at once (status 1)."""
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        if stop.is_set():
            raise SystemExit(1)
        logger.info("Received %s: deleting the application (its replicas drain)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not stop.wait(WAIT_TICK_S):
        pass


def serve_on_ray(configs: RayConfigs) -> int:
    """Start (or join) Ray, deploy :func:`~amulet_ray.application.build_application` at ``--host:--port``,
    serve until SIGTERM/SIGINT, delete the application; the exit status (see the module docstring)."""
    try:
        import ray
        from ray import serve

        from amulet_ray.application import build_application
    except ImportError as exc:
        logger.error("amulet-ray needs Ray Serve, which is not installed (%s): %s", exc.name, INSTALL_HINT)
        return EXIT_USAGE
    ray_config, server = configs.ray, configs.app.server
    joined = not ray.is_initialized()
    owns_cluster = joined and ray_config.address is None and not os.environ.get("RAY_ADDRESS")
    try:
        if joined:
            ray.init(address=ray_config.address)
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(build_application(configs), name=ray_config.app_name, route_prefix="/", blocking=False)
    except Exception as exc:
        logger.error("Ray Serve could not start the application: %s: %s", type(exc).__name__, exc)
        if joined and ray.is_initialized():
            ray.shutdown()
        return EXIT_STARTUP_FAILED
    replicas = f"{ray_config.replicas}..{ray_config.max_replicas}" if ray_config.autoscaling else str(ray_config.replicas)
    logger.info(
        "Serving %s replica(s) at http://%s:%d/v1 through Ray Serve (routing: %s%s)",
        replicas,
        server.host,
        server.port,
        ray_config.routing,
        f"; replica metrics from port {ray_config.metrics_port}" if ray_config.metrics_port else "",
    )
    try:
        wait_for_signal()
    finally:
        serve.delete(ray_config.app_name)
        if owns_cluster:  # a cluster shared with others keeps its Serve instance and other applications
            serve.shutdown()
        if joined:
            ray.shutdown()
    return 0
