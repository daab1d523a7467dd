"""``amulet-server``: parse every option in one place into the frozen configs, then run uvicorn.

The model loads in the engine's worker thread after the server starts listening: ``/health``
answers at once, ``/ready`` (and every API call) answers 503 until the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from amulet_core.engine.async_engine import AsyncEngine, model_display_name
from amulet_core.engine.config import EngineConfig, ModelConfig
from amulet_core.engine.protocol import EngineStats
from server.app import create_app
from server.config import DEFAULT_MAX_BODY_BYTES, ServerConfig
from server.metrics import PrometheusMetrics, mount_metrics

API_KEY_ENV = "AMULET_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


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
        "--default-system-prompt",
        default="",
        help="system message given to conversations without one when a preference is applied",
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
            model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype),
            engine=EngineConfig(
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                max_queue=args.max_queue,
                default_system_prompt=args.default_system_prompt,
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
    """The real engine behind the app, with Prometheus metrics at ``/metrics``."""
    name = configs.server.served_model_name or model_display_name(configs.model)
    engine: AsyncEngine | None = None
    metrics = PrometheusMetrics(name, lambda: engine.stats() if engine is not None else EngineStats())
    engine = AsyncEngine(configs.model, configs.engine, step_observer=metrics.step_observed)
    lifespan = engine_lifespan(engine, configs.server.drain_timeout_s)
    app = create_app(engine, configs.server, observer=metrics, lifespan=lifespan)
    mount_metrics(app, metrics)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse_args(argv)
    level = "DEBUG" if configs.server.log_level == "trace" else configs.server.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        build_app(configs),
        host=configs.server.host,
        port=configs.server.port,
        log_level=configs.server.log_level,
        timeout_graceful_shutdown=max(1, round(configs.server.drain_timeout_s)),
    )


if __name__ == "__main__":
    main()
