"""A replica's health as Ray Serve asks for it: the app's own ``/health`` and ``/ready``, called in-process.

Ray Serve calls a replica's ``check_health`` every ``health_check_period_s`` and replaces the replica when it
raises (or takes longer than ``health_check_timeout_s``). :func:`check_app_health` raises when the server
would tell its supervisor it cannot serve: the engine failed (the crash-only watchdog marked the app's
lifecycle, ``/health`` answers 503) or the app is not ready (``/ready`` 503: the model is not loaded, or the
app is draining). No Ray here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from amulet_ray.asgi_bridge import get

HEALTH_PATHS = ("/health", "/ready")


async def check_app_health(app: FastAPI, state: dict[str, Any] | None = None) -> None:
    """Return when the app serves; raise RuntimeError saying why not."""
    lifecycle = app.state.lifecycle
    if lifecycle.exit_status is not None:
        raise RuntimeError(f"The engine failed (exit status {lifecycle.exit_status}): {lifecycle.failure}")
    for path in HEALTH_PATHS:
        status, body = await get(app, path, state)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {body[:300].decode(errors='replace')}")
