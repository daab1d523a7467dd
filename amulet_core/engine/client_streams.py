"""What the asyncio side and the engine's worker thread share: each open request's output queue, the requests handed
to the worker that it has not counted yet, and its last statistics.

The event loop opens and closes streams (:meth:`ClientStreams.open`, :meth:`ClientStreams.close`); the worker
delivers outputs to them (:meth:`ClientStreams.deliver`, through ``call_soon_threadsafe``: the loop never waits on
the model) and after every round publishes its statistics with the requests it took in (:meth:`ClientStreams.counted`),
under one lock, so that the queue's length a new request is measured against counts each request once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from amulet_core.engine.protocol import EngineStats, GenerationOutput
from amulet_core.errors import EngineOverloadedError


@dataclass(eq=False)
class Stream:
    """One request's outputs, for the event loop that awaits them (an exception ends the stream: it is raised)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationOutput | BaseException]


class ClientStreams:
    """The open requests' streams, by request id (see the module's docstring)."""

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._unseen_adds = 0
        """Requests handed to the worker that its last statistics do not count yet."""
        self.stats = EngineStats()
        """The worker's last statistics."""

    def open(self, request_id: str, max_queue: int) -> Stream:
        """A stream for a request about to be handed to the worker, on the running event loop. Raises
        EngineOverloadedError when ``max_queue`` requests are waiting already, ValueError for an open request id."""
        stream = Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._unseen_adds + self.stats.waiting_requests >= max_queue:
                raise EngineOverloadedError("The server is at capacity; retry shortly.")
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
            self._unseen_adds += 1
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def ids(self) -> list[str]:
        """The open requests' ids."""
        with self._lock:
            return list(self._streams)

    def counted(self, stats: EngineStats, adds: int) -> None:
        """The worker's statistics after a round in which it took in ``adds`` requests (worker thread)."""
        with self._lock:
            self.stats = stats
            self._unseen_adds -= adds

    def deliver(self, outputs: list[GenerationOutput]) -> None:
        """Each output to its request's stream, if still open (worker thread)."""
        if not outputs:
            return
        with self._lock:
            targets = [(self._streams.get(o.request_id), o) for o in outputs]
        for stream, output in targets:
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)

    def end_all(self, error: BaseException) -> None:
        """End every open stream with ``error`` (raised where each is awaited)."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
