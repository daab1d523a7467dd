"""Run a real uvicorn server on 127.0.0.1 (a free port) in a background thread, for HTTP tests.

The socket is bound before uvicorn starts, so the port is known and cannot be taken meanwhile.
:func:`engine_server` puts the real engine over an already loaded model behind such a server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import torch
import uvicorn
from fastapi import FastAPI

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.model.loading import LoadedModel, ModelConfig
from server.app import create_app
from server.assembly import engine_lifespan
from server.config import DEFAULT_KEEP_ALIVE_TIMEOUT_S, ServerConfig
from server.metrics import PrometheusMetrics, mount_metrics

T = TypeVar("T")

START_TIMEOUT_S = 30.0
FIRST_POLL_S = 0.01
LONGEST_POLL_S = 0.1
""":func:`wait_until` checks every 10 ms at first, then less and less often, down to every 0.1 s: a check over HTTP
costs about 40 ms of CPU (``httpx.get`` builds a client each time), and a tight loop of them took a whole core from
the server subprocess it waited for (on these 2 cores that doubled its start-up)."""


class LiveServer:
    """A uvicorn server serving ``app`` from its own thread and event loop."""

    def __init__(
        self, app: Any, send_buffer: int | None = None, make_config: Callable[[Any], uvicorn.Config] | None = None
    ) -> None:
        """``send_buffer``: the kernel send buffer of the listening socket, inherited by accepted connections
        (a small one acts like a slow network: a client that does not read soon blocks the server's writes).
        ``make_config``: uvicorn's settings for ``app`` (e.g. ``amulet-server``'s own, ``server.cli.uvicorn_config``;
        its address is ignored: the server listens on the socket bound here); default: plain uvicorn's, with the
        server's keep-alive timeout."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if make_config is None:
            config = uvicorn.Config(
                app,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=5,
                timeout_keep_alive=DEFAULT_KEEP_ALIVE_TIMEOUT_S,  # as amulet-server: longer than clients' pool expiry
            )
        else:
            config = make_config(app)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[self._sock])

        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def run(self, make: Callable[[], Awaitable[T]], timeout: float = 600) -> T:
        """Run a coroutine on the server's event loop (e.g. call the engine directly) and wait for it."""
        if self._loop is None:
            raise RuntimeError("the server is not running")

        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)


@contextmanager
def live_server(
    app: Any, send_buffer: int | None = None, make_config: Callable[[Any], uvicorn.Config] | None = None
) -> Iterator[LiveServer]:
    server = LiveServer(app, send_buffer, make_config).start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` (for effects that happen on the server thread after a response), soon at first and then
    less often (see :data:`LONGEST_POLL_S`)."""
    deadline = time.monotonic() + timeout
    pause = FIRST_POLL_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 1.5, LONGEST_POLL_S)


def wait_ready(url: str, timeout: float = 900.0) -> None:
    """Wait until ``/ready`` answers 200 (the model has loaded); one client for all the checks."""
    with httpx.Client(timeout=5) as client:
        wait_until(lambda: client.get(f"{url}/ready").status_code == 200, timeout, "the model to load")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a subprocess to bind, or to find nobody there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EngineServer:
    """A live server over a real AsyncEngine (see :func:`engine_server`)."""

    server: LiveServer
    engine: AsyncEngine
    app: FastAPI

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def chat_url(self) -> str:
        return f"{self.server.url}/v1/chat/completions"


@contextmanager
def engine_server(
    loaded: LoadedModel,
    engine_config: EngineConfig,
    send_buffer: int | None = None,
    server_config: ServerConfig | None = None,
    with_metrics: bool = False,
) -> Iterator[EngineServer]:
    """The real engine over ``loaded`` (a float32 model, e.g. the session's SmolLM2) behind a live server, once ready.

    Torch runs on one thread meanwhile: the test's HTTP clients share the machine's 2 cores, and torch's
    intra-op threads slow down many times over when one of them has to wait for a core at every operation.
    ``server_config``: the app's settings (default ``ServerConfig()``); ``with_metrics``: Prometheus at /metrics.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    metrics = PrometheusMetrics("test-model", lambda: engine.stats()) if with_metrics else None
    observer = metrics.step_observed if metrics is not None else None
    engine = AsyncEngine(
        ModelConfig(dtype="float32", cpu_threads=1), engine_config, step_observer=observer, loader=lambda _: loaded
    )
    config = server_config or ServerConfig()
    app = create_app(engine, config, observer=metrics, lifespan=engine_lifespan(engine, drain_timeout_s=5))
    if metrics is not None:
        mount_metrics(app, metrics)
    try:
        with live_server(app, send_buffer) as server:
            wait_ready(server.url)
            yield EngineServer(server, engine, app)
    finally:
        torch.set_num_threads(threads)
