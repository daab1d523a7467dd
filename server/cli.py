"""``amulet-server``: parse every option in one place into the frozen configs, then run uvicorn.

The model loads in the engine's worker thread after the server starts listening: ``/health``
answers at once, ``/ready`` (and every API call) answers 503 until the model is loaded.

Shutdown drains (:class:`DrainingServer`): on SIGTERM (or Ctrl-C) new API calls get 503 with
``Retry-After`` while the running requests finish, for up to ``--drain-timeout`` seconds; what
still runs then is aborted (its stream ends with an error event) and the process exits 0.
A second signal stops at once.

A model that fails to load makes the process exit with status 4 (``--wait-for-model`` keeps it up,
not ready, instead), a stalled or dead engine worker with status 5 (``--engine-stall-timeout``);
see :mod:`server.supervision` for every exit status.

``--ray`` serves replicas of this same app on Ray Serve instead (:mod:`server.ray_serve`; Ray is imported
only then).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import EngineStats
from amulet_core.method.preference_prompts import TEMPLATE
from amulet_core.model.gguf_cache import MODEL_CACHE_ENV, default_model_cache
from amulet_core.model.loading import ModelConfig, model_display_name
from server.app import create_app
from server.config import DEFAULT_MAX_BODY_BYTES, ServerConfig
from server.draining import DrainingServer, drainer
from server.lifecycle import ServerLifecycle
from server.metrics import PrometheusMetrics, mount_metrics
from server.ray_serve.config import RayServeConfig, add_ray_arguments, ray_config_from_args
from server.supervision import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    EXIT_STARTUP_FAILED,
    TEST_FAULTS,
    fault_hook_for_tests,
    resolve_api_keys,
    supervise,
)
from server.tool_parsers import TOOL_PARSERS

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
FLUSH_TIMEOUT_S = 5
"""After draining, how long uvicorn may take to send the last bytes before it cuts connections."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Configs:
    model: ModelConfig
    engine: EngineConfig
    server: ServerConfig
    wait_for_model: bool = False
    """Stay up (not ready) when the model fails to load, instead of exiting with status 4."""
    engine_stall_timeout_s: float | None = None
    """A step running longer than this is a stall (exit status 5); None sizes it from the step time."""
    test_engine_fault: str | None = None
    """TEST-ONLY (hidden ``--test-engine-fault``): make the worker stall or die a few tokens in."""
    ray: RayServeConfig | None = None
    """``--ray``: serve replicas on Ray Serve (see :mod:`server.ray_serve`); None serves here with uvicorn."""


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
        "--model-cache",
        default=None,
        metavar="DIR|none",
        help=f"folder keeping a converted copy of a .gguf model (the embedded one too) that loads in about a second "
        f"instead of many; 'none' loads the GGUF file every time (default: ${MODEL_CACHE_ENV}, else "
        "~/.cache/amulet-serve/models)",
    )
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
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens one forward pass may hold; longer prompts are prefilled in chunks (default: 4096 on a GPU, 512 on a CPU)",
    )
    p.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=EngineConfig.kv_cache_memory_gib,
        help="memory for the paged KV cache, all sequences together, in GiB (default: %(default)s)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on a CUDA device, launch every decode step from Python instead of replaying CUDA graphs "
        "(captured per batch-size and context-length bucket on first use)",
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
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on /v1; visible in 'ps', prefer --api-key-file or ${API_KEY_ENV} "
        f"(default: ${API_KEY_ENV}; unset = open)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help=f"file of accepted keys, one a line ('#' comments; several for rotation) (default: ${API_KEY_FILE_ENV})",
    )
    p.add_argument(
        "--wait-for-model",
        action="store_true",
        help="when the model fails to load, stay up and not ready instead of exiting with status 4",
    )
    p.add_argument(
        "--no-playground",
        action="store_true",
        help="do not serve the browser playground at / (the API is unchanged)",
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
    p.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a step running longer is a stall: /health turns 503, running requests fail, the process exits with "
        "status 5 after the drain timeout (default: max(60, 20 x the measured step time))",
    )
    p.add_argument("--test-engine-fault", choices=TEST_FAULTS, default=None, help=argparse.SUPPRESS)  # test-only
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    add_ray_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Configs:
    """All configs from the command line (and ``$AMULET_API_KEY`` / ``$AMULET_API_KEY_FILE``, read here once);
    exits with a usage error (status 2) on bad values, such as an unreadable or empty key file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    try:
        if args.engine_stall_timeout is not None and not args.engine_stall_timeout > 0:
            raise ValueError(f"--engine-stall-timeout must be above 0, got {args.engine_stall_timeout}")
        api_keys = resolve_api_keys(args.api_key, args.api_key_file, env)
        return Configs(
            model=ModelConfig(
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                cpu_threads=args.cpu_threads,
                model_cache=_model_cache(args.model_cache, env),
            ),
            engine=EngineConfig(
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                max_queue=args.max_queue,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory_gib=args.kv_cache_memory_gib,
                cuda_graphs=not args.enforce_eager,
            ),
            server=ServerConfig(
                host=args.host,
                port=args.port,
                api_key=api_keys[0] if api_keys else None,
                extra_api_keys=api_keys[1:],
                cors_origins=origins,
                served_model_name=args.served_model_name,
                log_level=args.log_level,
                max_body_bytes=args.max_body_bytes,
                drain_timeout_s=args.drain_timeout,
                default_system_prompt=args.default_system_prompt,
                max_n=args.max_n,
                max_preferences=args.max_preferences,
                tool_call_parser=args.tool_call_parser,
                playground=not args.no_playground,
            ),
            wait_for_model=args.wait_for_model,
            engine_stall_timeout_s=args.engine_stall_timeout,
            test_engine_fault=args.test_engine_fault,
            ray=ray_config_from_args(args),
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _model_cache(option: str | None, env: Mapping[str, str]) -> str | None:
    """``--model-cache`` (``none`` turns it off), else the environment's or the default folder."""
    if option is None:
        return default_model_cache(env)
    return None if option.strip().lower() in ("", "none", "off") else option


def engine_lifespan(
    engine: AsyncEngine,
    drain_timeout_s: float,
    *,
    supervise_load: bool = False,
    exit_on_load_error: bool = True,
    on_engine_failure: Callable[[], None] = lambda: None,
) -> Callable[[FastAPI], Any]:
    """Start the engine (the model loads in its worker thread) with the app; drain it at shutdown.

    ``supervise_load``: run :func:`server.supervision.supervise`: when the load fails, log why and
    (``exit_on_load_error``) mark the app's lifecycle failed (``app.state.lifecycle.fail``), which makes
    :class:`DrainingServer` exit with status 4; once loaded, the engine watchdog (exit status 5, calling
    ``on_engine_failure`` first)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watch = None
        if supervise_load:
            watch = asyncio.create_task(supervise(engine, app.state.lifecycle, exit_on_load_error, on_engine_failure))
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await engine.shutdown(drain_timeout_s)

    return lifespan


def build_app(configs: Configs) -> FastAPI:
    """The real engine behind the app, with Prometheus metrics at ``/metrics``.

    ``app.state.engine`` is the AsyncEngine and ``app.state.lifecycle`` the draining state (for :func:`drainer`).
    """
    name = configs.server.served_model_name or model_display_name(configs.model)
    engine: AsyncEngine | None = None
    metrics = PrometheusMetrics(name, lambda: engine.stats() if engine is not None else EngineStats())
    engine = AsyncEngine(
        configs.model,
        configs.engine,
        step_observer=metrics.step_observed,
        stall_timeout_s=configs.engine_stall_timeout_s,
        fault_hook=fault_hook_for_tests(configs.test_engine_fault),
    )
    lifespan = engine_lifespan(
        engine,
        configs.server.drain_timeout_s,
        supervise_load=True,
        exit_on_load_error=not configs.wait_for_model,
        on_engine_failure=metrics.engine_stalled,
    )
    app = create_app(engine, configs.server, observer=metrics, lifespan=lifespan)
    app.state.engine = engine
    mount_metrics(app, metrics)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse_args(argv)
    level = "DEBUG" if configs.server.log_level == "trace" else configs.server.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if configs.ray is not None:  # Ray is imported only here, only with --ray
        from server.ray_serve.launcher import serve_on_ray

        raise SystemExit(serve_on_ray(configs))
    app = build_app(configs)
    config = uvicorn.Config(
        app,
        host=configs.server.host,
        port=configs.server.port,
        log_level=configs.server.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
    )
    lifecycle: ServerLifecycle = app.state.lifecycle
    server = DrainingServer(config, drainer(lifecycle, app.state.engine, configs.server.drain_timeout_s), lifecycle)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server had started
        server.run()
    if lifecycle.exit_status is not None:
        raise SystemExit(lifecycle.exit_status)
    if not server.started:
        raise SystemExit(EXIT_STARTUP_FAILED)  # uvicorn's code for a failed startup (e.g. the port is taken)


if __name__ == "__main__":
    main()
