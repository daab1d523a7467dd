"""Crash-only operation: the exit statuses a supervisor acts on, the model-load watch and the engine watchdog.

A process that cannot serve exits with a status that says why, so that a supervisor (Docker's restart
policy, Kubernetes, systemd) restarts it instead of leaving it up and never ready:

* ``0``: a normal shutdown (SIGTERM or Ctrl-C, after draining).
* ``2``: a usage error (a bad option, an unreadable or empty ``--api-key-file``).
* ``3``: the HTTP server could not start (for example the port is taken).
* ``4``: the model failed to load (unless ``--wait-for-model`` keeps the process up, not ready).
* ``5``: the engine stopped making progress (a step ran past ``--engine-stall-timeout``, requests were
  pending and none progressed for that long, or its worker thread died): ``/health`` turned 503, running
  requests ended with an ``engine_stalled`` error, new ones were refused with 503, and the process exited
  after the drain timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.protocol import GenerationRequest
from server.lifecycle import ServerLifecycle

EXIT_USAGE = 2
EXIT_STARTUP_FAILED = 3
EXIT_LOAD_FAILED = 4
EXIT_ENGINE_FAILED = 5
TEST_FAULTS = ("stall", "die")
"""Test-only faults of the hidden ``--test-engine-fault`` option (see :func:`fault_hook_for_tests`)."""
_FAULT_AFTER_CALLS = 3
WATCHDOG_POLL_S = 0.5
_LOAD_POLL_S = 0.1

logger = logging.getLogger(__name__)


async def supervise(
    engine: AsyncEngine, lifecycle: ServerLifecycle, exit_on_load_error: bool, on_engine_failure: Callable[[], None]
) -> None:
    """The whole watch of a served engine: its load (:func:`watch_load`), then, once loaded, a watchdog that
    polls :meth:`AsyncEngine.failure` every :data:`WATCHDOG_POLL_S`. On a failure: log it, call
    ``on_engine_failure`` (the stall counter), fail the engine's open streams, turn ``/health`` to 503
    (``lifecycle.engine_failure``) and ask the server to drain and exit with :data:`EXIT_ENGINE_FAILED`."""
    await watch_load(engine, lifecycle, exit_on_load_error)
    if engine.load_error is not None:
        return
    while (reason := engine.failure()) is None:
        await asyncio.sleep(WATCHDOG_POLL_S)
    logger.error("Engine failure, draining then exiting with status %d: %s", EXIT_ENGINE_FAILED, reason)
    on_engine_failure()
    engine.fail(reason)
    lifecycle.engine_failure = reason
    lifecycle.start_draining()  # now, not at the server's next tick: no request may slip in and meet "not ready"
    lifecycle.fail(EXIT_ENGINE_FAILED, reason)


class _WorkerKilled(BaseException):
    """Raised by the test-only "die" fault: not an Exception, so nothing catches it and the worker thread ends."""


def fault_hook_for_tests(kind: str | None) -> Callable[[GenerationRequest], None] | None:
    """TEST-ONLY: an ``LLMEngine.fault_hook`` that, at its third call (a few tokens into the first request),
    blocks the worker for ever (``stall``) or kills the worker thread (``die``); None for no fault."""
    if kind is None:
        return None
    if kind not in TEST_FAULTS:
        raise ValueError(f"unknown test fault {kind!r}")
    calls = 0

    def hook(_: GenerationRequest) -> None:
        nonlocal calls
        calls += 1
        if calls < _FAULT_AFTER_CALLS:
            return
        logger.warning("Test-only fault %r fires in the engine's worker thread", kind)
        if kind == "stall":
            threading.Event().wait()
        raise _WorkerKilled("test-only fault: the worker thread is killed")

    return hook


async def watch_load(engine: AsyncEngine, lifecycle: ServerLifecycle, exit_on_failure: bool) -> None:
    """Wait (polling, so a shutdown meanwhile is never held up) until the model has loaded or failed to.

    On a failure log the reason, then ask the server to exit with :data:`EXIT_LOAD_FAILED`
    (``exit_on_failure``) or leave it up, not ready (``--wait-for-model``)."""
    while not engine.load_finished:
        await asyncio.sleep(_LOAD_POLL_S)
    error = engine.load_error
    if error is None:
        return
    reason = f"{type(error).__name__}: {error}"
    if not exit_on_failure:
        logger.error("The model failed to load; staying up, not ready (--wait-for-model): %s", reason)
        return
    logger.error("The model failed to load, exiting with status %d: %s", EXIT_LOAD_FAILED, reason)
    lifecycle.fail(EXIT_LOAD_FAILED, reason)
