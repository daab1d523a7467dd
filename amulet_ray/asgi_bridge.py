"""Calling an ASGI app in-process: a forwarded HTTP request in, its ASGI messages out; and the app's lifespan.

A replica runs ``amulet-server``'s own FastAPI app without a socket: :func:`call_app` hands it one
:class:`ForwardedRequest` (the raw request the ingress read) and yields the ``http.response.*`` messages
the app sends, in batches, as they come (a stream stays a stream). When the caller stops reading
(the client left, or Ray cancelled the call), the app's ``receive`` answers ``http.disconnect``, exactly
as uvicorn's does, so the app aborts the generation and frees its KV. :class:`AsgiLifespan` runs the
app's startup and shutdown (the engine's start and drain) as uvicorn would. No Ray here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]
CLEANUP_TIMEOUT_S = 10.0
"""After the caller left, how long the app may take to finish (abort, free KV) before it is cancelled."""


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it (picklable: it travels through a Ray handle).

    ``prefix_chain`` is the routing key read by the request router; the replica ignores it. Its ``repr`` (what
    Ray's and the server's logs and tracebacks show) leaves out the query, the headers (``Authorization``) and
    the body (the caller's text)."""

    method: str
    path: str
    query_string: bytes = field(default=b"", repr=False)
    headers: Headers = field(default=(), repr=False)
    body: bytes = field(default=b"", repr=False)
    client: tuple[str, int] | None = None
    root_path: str = ""
    """The route prefix the application is served under (``path`` includes it, as in ASGI)."""
    prefix_chain: tuple[int, ...] = field(default=(), repr=False)

    def scope(self, state: dict[str, Any]) -> dict[str, Any]:
        """The ASGI HTTP scope of this request (``state``: the lifespan's state, shared as uvicorn shares it)."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query_string,
            "root_path": self.root_path,
            "headers": [(name.lower(), value) for name, value in self.headers],
            "client": self.client,
            "server": None,
            "state": dict(state),
        }


async def call_app(
    app: ASGIApp, request: ForwardedRequest, extra_headers: Headers = (), state: dict[str, Any] | None = None
) -> AsyncIterator[list[Message]]:
    """The app's answer to ``request``: lists of ASGI send messages, in order, each list what was ready.

    ``extra_headers`` are added to ``http.response.start``. Closing or cancelling the iterator before the
    end tells the app the client disconnected and leaves it :data:`CLEANUP_TIMEOUT_S` to finish."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        queue.put_nowait(message)

    async def run() -> None:
        try:
            await app(request.scope(state or {}), receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(run())
    finished = False
    try:
        while not finished:
            batch: list[Message] = []
            item = await queue.get()
            while True:
                if item is None:
                    finished = True
                    break
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
        await task  # re-raise what the app raised (it answers errors itself; this is a bug if it happens)
    finally:
        if not task.done():
            disconnected.set()
            asyncio.ensure_future(_finish(task))


async def _finish(task: asyncio.Future[None]) -> None:
    """Let an app whose caller left end on its own (it saw the disconnect); cancel it past the timeout."""
    done, _ = await asyncio.wait({task}, timeout=CLEANUP_TIMEOUT_S)
    if not done:
        logger.warning("The app did not end within %.0f s of its client leaving; cancelling it", CLEANUP_TIMEOUT_S)
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


LOCAL_HOST_HEADERS: Headers = ((b"host", b"localhost"),)
"""An in-process call's headers: it comes from this process, so it names the local host (which the server trusts)."""


async def get(app: ASGIApp, path: str, state: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """``GET path`` on the app in-process (a health check, the metrics): the status and the whole body."""
    status, body = 0, b""
    async for batch in call_app(app, ForwardedRequest("GET", path, headers=LOCAL_HOST_HEADERS), state=state):
        for message in batch:
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")
    return status, body


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ASGI headers, or None."""
    return next((value for key, value in headers if key.lower() == name), None)


class AsgiLifespan:
    """Runs an ASGI app's lifespan protocol: :meth:`startup` before the first request, :meth:`shutdown` after
    the last. ``state`` is the lifespan state every request scope gets a copy of."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Future[None] | None = None
        self.state: dict[str, Any] = {}

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        await self._outbox.put(message)

    async def _expect(self, event: str) -> None:
        if self._task is None:
            raise RuntimeError("the lifespan was not started")
        reply: asyncio.Future[Any] = asyncio.ensure_future(self._outbox.get())
        waited: set[asyncio.Future[Any]] = {reply, self._task}
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if not reply.done():
            reply.cancel()
            self._task.result()  # the app raised: re-raise it
            raise RuntimeError(f"the app's lifespan ended before {event}")
        message = reply.result()
        if message["type"] != f"lifespan.{event}.complete":
            raise RuntimeError(f"the app's lifespan {event} failed: {message.get('message', message['type'])}")

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._task = asyncio.ensure_future(self._app(scope, self._receive, self._send))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._expect("startup")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._expect("shutdown")
        await self._task
