"""How long the engine's current step has run, and when that counts as a stall.

The worker thread marks each step's start and end (:meth:`StepWatch.started`, :meth:`StepWatch.finished`);
the server's watchdog reads :meth:`StepWatch.stalled_for` from the event loop. Single floats are written
by one thread and read by another, which the GIL makes safe without a lock.
"""

from __future__ import annotations

import time

MIN_STALL_TIMEOUT_S = 60.0
"""Floor of the automatic stall timeout (a first step, a long prefill or a compile may take a while)."""
STALL_STEP_FACTOR = 20.0
"""The automatic stall timeout is this many times the measured step time, when that is above the floor."""
_EMA_WEIGHT = 0.1


class StepWatch:
    """The running step's start time and a moving average of step times.

    ``stall_timeout_s`` None sizes the timeout from the measured steps:
    ``max(MIN_STALL_TIMEOUT_S, STALL_STEP_FACTOR * average step time)``; a number fixes it (must be > 0)."""

    def __init__(self, stall_timeout_s: float | None = None) -> None:
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"the stall timeout must be above 0 s, got {stall_timeout_s}")
        self._fixed = stall_timeout_s
        self._started: float | None = None
        self._average_s: float | None = None

    def started(self) -> None:
        """Called by the worker just before a step."""
        self._started = time.monotonic()

    def finished(self) -> None:
        """Called by the worker once a step has returned (or raised)."""
        started, self._started = self._started, None
        if started is None:
            return
        duration = time.monotonic() - started
        average = self._average_s
        self._average_s = duration if average is None else average + _EMA_WEIGHT * (duration - average)

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
        elapsed = time.monotonic() - started
        return elapsed if elapsed > self.timeout_s else None
