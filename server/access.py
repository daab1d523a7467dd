"""Which routes are open: everything else needs the API key (when one is configured) and is refused while draining.

Closed by default: a route added later needs the key unless it is named here. The open ones are what a
probe, a scraper or a browser needs before it can hold a key:

* ``/health``, ``/ready`` (and ``/health/ready``): liveness and readiness probes, which carry no credentials;
* ``/metrics``: aggregate counters and histograms only (no request text, no keys, no per-caller labels),
  scraped by Prometheus without credentials as vLLM's are; every shipped deployment keeps the port off
  public interfaces (compose publishes on 127.0.0.1; the KubeRay manifest's NetworkPolicy);
* the playground's page and its two static files (when served): the page holds no data, and the API calls
  it makes send the key the user types;
* with ``--docs`` only: ``/docs``, ``/redoc`` and ``/openapi.json`` (Swagger UI fetches the schema without a key).

Routes are matched on the *routed* path, the path less the ASGI ``root_path`` (what the router matches), so
that an app served under a prefix (a Ray Serve ``route_prefix``) is guarded exactly as at ``/``; the match
is exact (``/health/`` or ``/playground/x`` is not open).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.config import ServerConfig
from server.playground import PLAYGROUND_ROUTES

HEALTH_ROUTES = ("/health", "/ready", "/health/ready")
METRICS_ROUTE = "/metrics"
DOCS_ROUTES = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def routed_path(scope: Mapping[str, Any]) -> str:
    """The path the app's router matches: ``path`` less ``root_path`` when it starts with it at a segment
    boundary (as Starlette's ``get_route_path`` reads it; tests/server/test_security_api.py checks they agree)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


def open_routes(config: ServerConfig) -> frozenset[str]:
    """The routes a request may reach without the API key (and that stay served while draining)."""
    routes = {*HEALTH_ROUTES, METRICS_ROUTE}
    if config.playground:
        routes.update(PLAYGROUND_ROUTES)
    if config.docs:
        routes.update(DOCS_ROUTES)
    return frozenset(routes)
