"""Graceful shutdown of the CLI's server: drain on the first SIGTERM/SIGINT, or once the lifecycle has failed.

Used by :func:`server.cli.main`; see its module docstring for what the operator sees.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

from amulet_core.engine.async_engine import AsyncEngine
from server.lifecycle import ServerLifecycle

logger = logging.getLogger(__name__)


def drainer(lifecycle: ServerLifecycle, engine: AsyncEngine, drain_timeout_s: float) -> Callable[[], Awaitable[None]]:
    """The first half of a graceful shutdown: refuse new API calls (503), let the running ones
    finish for up to ``drain_timeout_s``, then abort the rest and stop the engine.

    After an engine failure (``lifecycle.engine_failure``) the process stays up, answering 503 on
    ``/health`` and the API, for the whole ``drain_timeout_s`` before it stops, so that health checks
    and load balancers see the failure before the connection is refused."""

    async def drain() -> None:
        lifecycle.start_draining()
        logger.info(
            "Draining: new requests get 503; waiting up to %.1f s for %d running request(s)",
            drain_timeout_s,
            lifecycle.in_flight,
        )
        if await lifecycle.wait_idle(drain_timeout_s):
            logger.info("Drained: no request is running")
        else:
            logger.warning("Drain timeout: aborting %d request(s) still running", lifecycle.in_flight)
        if lifecycle.engine_failure is not None:
            await asyncio.sleep(drain_timeout_s - (time.monotonic() - (lifecycle.drain_started_at or time.monotonic())))
        # Aborted streams end with an error event (the server is shutting down); nothing is cut mid-event.
        await engine.shutdown(0)

    return drain


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains before uvicorn stops.

    On its own, uvicorn closes the listening socket as soon as the signal comes, so a request that
    arrives during shutdown is refused at the TCP level (connection refused), and running requests
    get only ``timeout_graceful_shutdown``. Here the first signal runs ``drain`` (see :func:`drainer`)
    while uvicorn keeps listening, so new callers get a 503 with ``Retry-After`` they can act on;
    then uvicorn's own shutdown runs. A second signal stops at once.

    A failure marked on ``lifecycle`` (:meth:`ServerLifecycle.fail`) drains the same way; the CLI then
    exits with its status.
    """

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]], lifecycle: ServerLifecycle | None = None
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.draining = False

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: stop now, skipping the wait for connections
            self.should_exit = self.force_exit = True
            return
        if self._loop is None or not self.started or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        logger.info("Received %s: draining before shutdown", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s), which also starts the drain once the lifecycle has failed."""
        failed = self._lifecycle is not None and self._lifecycle.exit_status is not None
        if failed and self.started and not self.draining and not self.should_exit:
            self.draining = True
            self._start_drain()
        return await super().on_tick(counter)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            logger.exception("Draining failed; shutting down")
        finally:
            self.should_exit = True
