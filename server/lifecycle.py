"""Graceful shutdown support: count the HTTP requests in flight, and refuse new API calls while draining.

The CLI's signal handling (see ``server.draining.DrainingServer``) marks the server draining on SIGTERM:
from then on every new request but those to the open routes (:mod:`server.access`: probes, metrics, the
playground's files) is answered 503 with ``Retry-After`` (and ``Connection: close``) and ``/ready`` answers
503, while the requests already running finish; the CLI waits for :meth:`ServerLifecycle.wait_idle` (up to
``--drain-timeout``) before it lets uvicorn stop.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from amulet_core.errors import EngineStalledError
from server.access import routed_path
from server.errors import SERVER_ERROR, APIError, send_error

DRAINING_CODE = "server_shutting_down"
_POLL_S = 0.05


class ServerLifecycle:
    """In-flight request count and the draining flag. Used from the event loop only (no locking)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.drain_started_at: float | None = None
        self.exit_status: int | None = None
        """Set by :meth:`fail`: the non-zero status the process should exit with (after draining)."""
        self.failure: str | None = None
        self.engine_failure: str | None = None
        """Why the engine can serve no more (see ``server.supervision.supervise``): /health turns 503."""

    def fail(self, status: int, reason: str) -> None:
        """Ask the process to drain and exit with ``status`` (the first failure wins); the CLI's server
        (``server.draining.DrainingServer``) sees it within a tick. ``reason`` is for the server log only."""
        if self.exit_status is None:
            self.exit_status = status
            self.failure = reason

    def start_draining(self) -> None:
        """From now on refuse new API calls with 503; running requests go on."""
        if not self.draining:
            self.draining = True
            self.drain_started_at = time.monotonic()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most ``timeout_s``; True when idle."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        return self.in_flight == 0


def draining_error(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The server is shutting down and takes no new requests; retry later (or on another instance).",
        type=SERVER_ERROR,
        code=DRAINING_CODE,
        headers={"Retry-After": str(retry_after_s), "Connection": "close"},
    )


class LifecycleMiddleware:
    """Counts every HTTP request while the app serves it (a stream counts until its last byte is sent),
    and answers 503 to new requests outside ``open_routes`` (matched on the routed path, whatever the route
    prefix) once the server is draining."""

    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle, open_routes: frozenset[str], retry_after_s: int) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.open_routes = open_routes
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining and routed_path(scope) not in self.open_routes:
            failure = self.lifecycle.engine_failure
            error = EngineStalledError(failure) if failure is not None else draining_error(self.retry_after_s)
            await send_error(scope, receive, send, error)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1
