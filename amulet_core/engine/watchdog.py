"""When the engine counts as stalled: a step that runs too long, or work that makes no progress.

The worker thread marks each step's start and end (:meth:`StepWatch.started`, :meth:`StepWatch.finished`)
and, after each round of its loop, whether work is pending and whether it progressed
(:meth:`StepWatch.round_done`); the server's watchdog reads :meth:`StepWatch.stalled_for` and
:meth:`StepWatch.no_progress_for` from the event loop. Single floats are written by one thread and read by
another, which the GIL makes safe without a lock.

Steps that complete are not enough: a request that is never scheduled (say it waits at the head of the
queue for room that never comes) leaves the worker running empty steps for ever, each one quick. So work
that is pending (requests waiting or running) must also progress: a token generated, prompt tokens
prefilled (a long prompt is prefilled in many steps before its first token), or a request ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from amulet_core.engine.protocol import EngineStats

MIN_STALL_TIMEOUT_S = 60.0
"""Floor of the automatic stall timeout (a first step, a long prefill or a compile may take a while)."""
STALL_STEP_FACTOR = 20.0
"""The automatic stall timeout is this many times the measured step time, when that is above the floor."""
_EMA_WEIGHT = 0.1

Clock = Callable[[], float]


def _monotonic() -> float:
    return time.monotonic()  # looked up at each call (tests may patch this module's ``time.monotonic``)


class StepWatch:
    """The running step's start time, a moving average of step times, and since when pending work has not progressed.

    ``stall_timeout_s`` None sizes the timeout from the measured steps:
    ``max(MIN_STALL_TIMEOUT_S, STALL_STEP_FACTOR * average step time)``; a number fixes it (must be > 0). The
    same timeout bounds a step and pending work without progress. ``clock``: monotonic seconds (None:
    ``time.monotonic``; tests inject one).
    """

    def __init__(self, stall_timeout_s: float | None = None, clock: Clock | None = None) -> None:
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"the stall timeout must be above 0 s, got {stall_timeout_s}")
        self._fixed = stall_timeout_s
        self._clock = clock or _monotonic
        self._started: float | None = None
        self._average_s: float | None = None
        self._pending_since: float | None = None
        """When pending work last progressed (or became pending); None while there is none."""

    def started(self) -> None:
        """Called by the worker just before a step."""
        self._started = self._clock()

    def finished(self) -> None:
        """Called by the worker once a step has returned (or raised)."""
        started, self._started = self._started, None
        if started is None:
            return
        duration = self._clock() - started
        average = self._average_s
        self._average_s = duration if average is None else average + _EMA_WEIGHT * (duration - average)

    def round_done(self, pending: bool, progressed: bool) -> None:
        """Called by the worker after each round of its loop: whether requests are still waiting or running, and
        whether the round progressed (a token generated or prefilled, a request ended)."""
        if not pending:
            self._pending_since = None
        elif progressed or self._pending_since is None:
            self._pending_since = self._clock()

    @property
    def timeout_s(self) -> float:
        """The stall timeout now (the automatic one follows the measured step time)."""
        if self._fixed is not None:
            return self._fixed
        return max(MIN_STALL_TIMEOUT_S, STALL_STEP_FACTOR * (self._average_s or 0.0))

    def stalled_for(self) -> float | None:
        """Seconds the running step has taken when that is past the timeout; None otherwise (or when idle)."""
        started = self._started
        if started is None:
            return None
        elapsed = self._clock() - started
        return elapsed if elapsed > self.timeout_s else None

    def no_progress_for(self) -> float | None:
        """Seconds pending work has gone without progress when that is past the timeout; None otherwise (no
        work pending, or progress within the timeout)."""
        since = self._pending_since
        if since is None:
            return None
        elapsed = self._clock() - since
        return elapsed if elapsed > self.timeout_s else None

    def problem(self, stats: EngineStats) -> str | None:
        """Why the engine looks stuck (:meth:`stalled_for`, :meth:`no_progress_for`; ``stats``: its last statistics,
        for the message), or None."""
        stalled = self.stalled_for()
        if stalled is not None:
            return f"no engine step completed for {stalled:.0f} s (stall timeout {self.timeout_s:.0f} s)"
        starved = self.no_progress_for()
        if starved is None:
            return None
        return (
            f"no token was generated or prefilled for {starved:.0f} s with {stats.waiting_requests} request(s) waiting "
            f"and {stats.running_requests} running (stall timeout {self.timeout_s:.0f} s)"
        )
