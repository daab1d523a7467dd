"""Ctrl-C (SIGINT) for amulet-eval: the first one stops the run within seconds, keeping every finished answer; a
second one ends the process at once.

Stopping loses nothing finished: each answer (and each judge verdict) is appended and synced the moment it is made
(amulet_eval.store), and the report's files are replaced whole (amulet_eval.report). So, while :class:`CtrlC` owns
SIGINT:

* the first SIGINT cancels every task of the event loop that is running (no new request is sent, each HTTP call in
  flight is closed, so the server aborts it, each engine request is aborted, a beam search stops at its next step);
  outside an event loop (scoring, the report) it raises KeyboardInterrupt. It also arms a deadline: a run still
  stopping ``grace_s`` later (a model still loading, a stuck call) ends there;
* a second SIGINT ends the process at once;
* an interrupted run then ends without the interpreter's teardown (:func:`exit_now`), which takes about a second with
  torch, scipy and matplotlib loaded, and several on a busy machine.

A SIGINT that the parent process ignores (a background job of a non-interactive shell starts with it ignored) stays
ignored, as it does for any program.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import NoReturn

INTERRUPTED = 130
"""The exit status of a run ended by SIGINT (128 + 2), as shells report one."""
STOP_GRACE_S = 5.0
"""How long the first Ctrl-C lets the run stop cleanly before the process is ended anyway."""


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once stdout, stderr and the logs are flushed, skipping the interpreter's
    teardown (module finalisation, atexit handlers, joins of worker threads still busy)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def say(text: str) -> None:
    """One line on stderr, unbuffered: safe from a signal handler that interrupted a print, and from another thread."""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{text}\n".encode())


def cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task of ``loop`` (each one's ``finally`` closes its client or aborts its request)."""
    for task in asyncio.all_tasks(loop):
        task.cancel()


class CtrlC:
    """Owns SIGINT for the length of a ``with`` block, in the main thread when SIGINT has Python's default handler
    (anywhere else it changes nothing). ``end`` ends the process (``os._exit``; tests pass a recorder)."""

    def __init__(self, grace_s: float = STOP_GRACE_S, end: Callable[[int], object] = os._exit) -> None:
        self.grace_s = grace_s
        self.signals = 0
        """SIGINTs received inside the block."""
        self._end = end
        self._installed = False
        self._deadline: threading.Timer | None = None

    def __enter__(self) -> CtrlC:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            say("amulet-eval: interrupted again; stopping now (every finished answer is on disk).")
            self._end(INTERRUPTED)
            return
        say("amulet-eval: stopping (Ctrl-C again to stop at once).")
        self._deadline = threading.Timer(self.grace_s, self._overdue)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            loop = asyncio.get_running_loop()  # the handler runs in the main thread, inside its loop if one runs
            loop.call_soon_threadsafe(cancel_all_tasks, loop)  # from the loop, at its next turn
        except RuntimeError:  # no loop runs (or it is closing)
            raise KeyboardInterrupt from None

    def _overdue(self) -> None:
        say(f"amulet-eval: still stopping after {self.grace_s:g} s; stopping now (every finished answer is on disk).")
        self._end(INTERRUPTED)
