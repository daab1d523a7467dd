"""The served app with its real engine behind it: the engine's lifespan, supervision and Prometheus metrics.

:func:`build_app` is what ``amulet-server`` serves with uvicorn (``server.cli``) and what each Ray replica
serves in-process (``amulet_ray``); :func:`engine_lifespan` starts the engine with an app and drains it at
shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.protocol import EngineStats
from amulet_core.model.loading import model_display_name
from server.app import create_app
from server.metrics import PrometheusMetrics, mount_metrics
from server.options import Configs
from server.supervision import fault_hook_for_tests, supervise


def engine_lifespan(
    engine: AsyncEngine,
    drain_timeout_s: float,
    *,
    supervise_load: bool = False,
    exit_on_load_error: bool = True,
    on_engine_failure: Callable[[], None] = lambda: None,
) -> Callable[[FastAPI], Any]:
    """Start the engine (the model loads in its worker thread) with the app; drain it at shutdown.

    ``supervise_load``: run :func:`server.supervision.supervise`: when the load fails, log why and
    (``exit_on_load_error``) mark the app's lifecycle failed (``app.state.lifecycle.fail``), which makes
    :class:`~server.draining.DrainingServer` exit with status 4; once loaded, the engine watchdog (exit status 5, calling
    ``on_engine_failure`` first)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watch = None
        if supervise_load:
            watch = asyncio.create_task(supervise(engine, app.state.lifecycle, exit_on_load_error, on_engine_failure))
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await engine.shutdown(drain_timeout_s)

    return lifespan


def build_app(configs: Configs) -> FastAPI:
    """The real engine behind the app, with Prometheus metrics at ``/metrics``.

    ``app.state.engine`` is the AsyncEngine and ``app.state.lifecycle`` the draining state (for :func:`drainer`).
    """
    name = configs.server.served_model_name or model_display_name(configs.model)
    engine: AsyncEngine | None = None
    metrics = PrometheusMetrics(name, lambda: engine.stats() if engine is not None else EngineStats())
    engine = AsyncEngine(
        configs.model,
        configs.engine,
        step_observer=metrics.step_observed,
        stall_timeout_s=configs.engine_stall_timeout_s,
        fault_hook=fault_hook_for_tests(configs.test_engine_fault),
        freeze_gc_after_load=True,
    )
    lifespan = engine_lifespan(
        engine,
        configs.server.drain_timeout_s,
        supervise_load=True,
        exit_on_load_error=not configs.wait_for_model,
        on_engine_failure=metrics.engine_stalled,
    )
    app = create_app(engine, configs.server, observer=metrics, lifespan=lifespan)
    app.state.engine = engine
    mount_metrics(app, metrics)
    return app
