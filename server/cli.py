"""``amulet-server``: parse every option in one place into the frozen configs, then run uvicorn.

The model loads in the engine's worker thread after the server starts listening: ``/health``
answers at once, ``/ready`` (and every API call) answers 503 until the model is loaded.

Shutdown drains (:class:`DrainingServer`): on SIGTERM (or Ctrl-C) new API calls get 503 with
``Retry-After`` while the running requests finish, for up to ``--drain-timeout`` seconds; what
still runs then is aborted (its stream ends with an error event) and the process exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import EngineStats
from amulet_core.loading import ModelConfig, model_display_name
from amulet_core.prompts import TEMPLATE
from server.app import create_app
from server.config import DEFAULT_MAX_BODY_BYTES, ServerConfig
from server.lifecycle import ServerLifecycle
from server.metrics import PrometheusMetrics, mount_metrics
from server.tool_parsers import TOOL_PARSERS

API_KEY_ENV = "AMULET_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
FLUSH_TIMEOUT_S = 5
"""After draining, how long uvicorn may take to send the last bytes before it cuts connections."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Configs:
    model: ModelConfig
    engine: EngineConfig
    server: ServerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amulet-server",
        description="OpenAI-compatible server whose answers follow a per-request preference (Amulet decoding).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder or id, or a .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--served-model-name", default=None, help="model name the API reports and accepts")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads when running on the CPU (default: all cores but one, at least 1)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=EngineConfig.max_num_seqs,
        help="sequences decoded together; an amulet or la request holds two (default: %(default)s)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=EngineConfig.max_model_len,
        help="longest context, prompt plus answer, in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=EngineConfig.max_queue,
        help="requests that may wait; more are refused with 429 (default: %(default)s)",
    )
    p.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=("auto", *TOOL_PARSERS),
        help="format of the model's tool calls; auto picks it from the chat template (default: %(default)s)",
    )
    p.add_argument(
        "--max-preferences",
        type=int,
        default=ServerConfig.max_preferences,
        help="most preferences one request may combine, each a context decoded with the answer (default: %(default)s)",
    )
    p.add_argument(
        "--max-n",
        type=int,
        default=ServerConfig.max_n,
        help="most choices ('n') one request may ask for; each decodes its own sequences (default: %(default)s)",
    )
    p.add_argument(
        "--default-system-prompt",
        default=TEMPLATE,
        metavar="template|paper|none|TEXT",
        help="system message given to both contexts of a preference request whose conversation has none: the chat "
        "template's own default (template), the paper's (paper), an empty one (none) or TEXT (default: %(default)s)",
    )
    p.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer <key>' on /v1 (default: ${API_KEY_ENV}; unset = open)"
    )
    p.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS, or '*' (default: CORS off)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; bigger ones get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests may finish in at shutdown (default: %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    return p


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Configs:
    """All configs from the command line (and ``$AMULET_API_KEY``); exits with a usage error on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    api_key = args.api_key if args.api_key is not None else env.get(API_KEY_ENV) or None
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    try:
        return Configs(
            model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype, cpu_threads=args.cpu_threads),
            engine=EngineConfig(
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                max_queue=args.max_queue,
            ),
            server=ServerConfig(
                host=args.host,
                port=args.port,
                api_key=api_key,
                cors_origins=origins,
                served_model_name=args.served_model_name,
                log_level=args.log_level,
                max_body_bytes=args.max_body_bytes,
                drain_timeout_s=args.drain_timeout,
                default_system_prompt=args.default_system_prompt,
                max_n=args.max_n,
                max_preferences=args.max_preferences,
                tool_call_parser=args.tool_call_parser,
            ),
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def engine_lifespan(engine: AsyncEngine, drain_timeout_s: float) -> Callable[[FastAPI], Any]:
    """Start the engine (the model loads in its worker thread) with the app; drain it at shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(drain_timeout_s)

    return lifespan


def build_app(configs: Configs) -> FastAPI:
    """The real engine behind the app, with Prometheus metrics at ``/metrics``.

    ``app.state.engine`` is the AsyncEngine and ``app.state.lifecycle`` the draining state (for :func:`drainer`).
    """
    name = configs.server.served_model_name or model_display_name(configs.model)
    engine: AsyncEngine | None = None
    metrics = PrometheusMetrics(name, lambda: engine.stats() if engine is not None else EngineStats())
    engine = AsyncEngine(configs.model, configs.engine, step_observer=metrics.step_observed)
    lifespan = engine_lifespan(engine, configs.server.drain_timeout_s)
    app = create_app(engine, configs.server, observer=metrics, lifespan=lifespan)
    app.state.engine = engine
    mount_metrics(app, metrics)
    return app


def drainer(lifecycle: ServerLifecycle, engine: AsyncEngine, drain_timeout_s: float) -> Callable[[], Awaitable[None]]:
    """The first half of a graceful shutdown: refuse new API calls (503), let the running ones
    finish for up to ``drain_timeout_s``, then abort the rest and stop the engine."""

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
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
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

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            logger.exception("Draining failed; shutting down")
        finally:
            self.should_exit = True


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse_args(argv)
    level = "DEBUG" if configs.server.log_level == "trace" else configs.server.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(configs)
    config = uvicorn.Config(
        app,
        host=configs.server.host,
        port=configs.server.port,
        log_level=configs.server.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
    )
    server = DrainingServer(config, drainer(app.state.lifecycle, app.state.engine, configs.server.drain_timeout_s))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server had started
        server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's code for a failed startup (e.g. the port is taken)


if __name__ == "__main__":
    main()
