"""Every option of ``amulet-server``, parsed in one place into the frozen :class:`Configs`.

``--ray`` is the one option this parser does not act on: :func:`ray_requested` finds it, and
``server.cli.main`` then hands the whole command line to ``amulet-ray`` (:mod:`amulet_ray.cli`), whose
parser extends :func:`build_parser` with the ``--ray*`` options. Nothing here imports ``amulet_ray``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from amulet_core.engine.config import EngineConfig
from amulet_core.method.preference_prompts import TEMPLATE, Placement
from amulet_core.model.gguf_cache import MODEL_CACHE_ENV, default_model_cache
from amulet_core.model.loading import ModelConfig
from server.access_options import access_settings, add_access_arguments, open_api_refusal
from server.api_keys import API_KEY_ENV, API_KEY_FILE_ENV, resolve_api_keys
from server.config import ServerConfig
from server.engine_options import add_engine_arguments
from server.reasoning_parsers import REASONING_PARSERS
from server.store.options import add_store_arguments, store_config
from server.supervision import TEST_FAULTS
from server.tool_parsers import TOOL_PARSERS

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
RAY_FLAG = "--ray"
RAY_OPTIONS_PREFIX = "--ray-"
RAY_INSTALL_HINT = "pip install '.[ray]'"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def build_parser(prog: str = "amulet-server", *, ray_flag: bool = True, add_help: bool = True) -> argparse.ArgumentParser:
    """Every option of the server (what each engine and app runs with).

    ``ray_flag``: include ``--ray``, which hands the whole command line over to ``amulet-ray`` (see
    :func:`ray_requested`); ``amulet-ray``'s parser extends this one without it, adding its own ``--ray*``."""
    p = argparse.ArgumentParser(
        prog=prog,
        add_help=add_help,
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
        help="torch threads when running on the CPU (default: $OMP_NUM_THREADS, else every CPU the process may run on)",
    )
    add_engine_arguments(p)
    p.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=("auto", *TOOL_PARSERS),
        help="format of the model's tool calls; auto picks it from the chat template (default: %(default)s)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="a reasoning model's <think> blocks go to reasoning_content, apart from the answer (default: none, the "
        "thinking stays in content)",
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
        "--preference-placement",
        default=ServerConfig.preference_placement.value,
        choices=[placement.value for placement in Placement],
        help="where a preference request's sentences go when the request does not say (its 'preference.placement'): "
        "appended to the first system message (system, the paper's) or to the last user message (end: the contexts "
        "then share the conversation before it, and its KV cache); a request in the paper's mode keeps system "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on every route but /health, /ready, /metrics and the playground's "
        f"page; visible in 'ps', prefer --api-key-file or ${API_KEY_ENV} (default: ${API_KEY_ENV}; unset = open)",
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
    add_access_arguments(p)
    add_store_arguments(p)
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
        help="a step running longer, or requests pending this long with no token generated or prefilled, is a "
        "stall: /health turns 503, running requests fail, the process exits with status 5 after the drain timeout "
        "(default: max(60, 20 x the measured step time))",
    )
    p.add_argument("--test-engine-fault", choices=TEST_FAULTS, default=None, help=argparse.SUPPRESS)  # test-only
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    if ray_flag:
        p.add_argument(
            RAY_FLAG,
            action="store_true",
            help=f"serve replicas of this server on Ray Serve instead: the whole command line goes to amulet-ray, "
            f"whose --help lists the --ray-* options (needs {RAY_INSTALL_HINT})",
        )
    return p


def ray_requested(argv: Sequence[str]) -> bool:
    """Whether ``argv`` holds ``--ray`` as an option, read as the server's parser reads it (abbreviations too).

    ``--help`` is left to the parser that then parses the whole command line (the server's or ``amulet-ray``'s); a
    bad value of a server option is a usage error here already, as it would be there."""
    args, _ = build_parser(add_help=False).parse_known_args(list(argv))
    return bool(args.ray)


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Configs:
    """All configs from the command line (and ``$AMULET_API_KEY`` / ``$AMULET_API_KEY_FILE``, read here once);
    exits with a usage error (status 2) on bad values, such as an unreadable or empty key file."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if any(arg.startswith(RAY_OPTIONS_PREFIX) for arg in unknown):
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (the --ray-* options are amulet-ray's: add --ray)")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.ray:  # server.cli.main hands such a command line over before parsing it here
        parser.error("--ray is amulet-ray's: amulet_ray.config.parse_args parses such a command line")
    return configs_from_args(parser, args, environ)


def configs_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Configs:
    """The configs of options parsed by :func:`build_parser` (or a parser extending it); a bad value is a usage
    error of ``parser`` (status 2)."""
    env = os.environ if environ is None else environ
    origins = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
    try:
        if args.engine_stall_timeout is not None and not args.engine_stall_timeout > 0:
            raise ValueError(f"--engine-stall-timeout must be above 0, got {args.engine_stall_timeout}")
        api_keys = resolve_api_keys(args.api_key, args.api_key_file, env)
        refusal = open_api_refusal(args.host, api_keys, args.allow_open_api)
        if refusal is not None:
            raise ValueError(refusal)
        return Configs(
            model=ModelConfig(
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                cpu_threads=_cpu_threads(args.cpu_threads, env),
                model_cache=_model_cache(args.model_cache, env),
                quantization=args.quantization,
            ),
            engine=EngineConfig(
                max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len,
                max_queue=args.max_queue,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory_gib=args.kv_cache_memory_gib,
                kv_cache_dtype=args.kv_cache_dtype,
                contrast_logits=args.contrast_logits,
                gpu_memory_utilization=args.gpu_memory_utilization,
                cuda_graphs=not args.enforce_eager,
                graph_capture_seconds=args.graph_capture_seconds,
                deterministic=args.deterministic,
                attention_backend=args.attention_backend,
                overlap_host=args.overlap_host,
            ),
            server=ServerConfig(
                host=args.host,
                port=args.port,
                api_key=api_keys[0] if api_keys else None,
                extra_api_keys=api_keys[1:],
                cors_origins=origins,
                served_model_name=args.served_model_name,
                log_level=args.log_level,
                **access_settings(args),
                drain_timeout_s=args.drain_timeout,
                default_system_prompt=args.default_system_prompt,
                preference_placement=Placement(args.preference_placement),
                max_n=args.max_n,
                max_preferences=args.max_preferences,
                tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
                playground=not args.no_playground,
                store=store_config(args, env),
            ),
            wait_for_model=args.wait_for_model,
            engine_stall_timeout_s=args.engine_stall_timeout,
            test_engine_fault=args.test_engine_fault,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _model_cache(option: str | None, env: Mapping[str, str]) -> str | None:
    """``--model-cache`` (``none`` turns it off), else the environment's or the default folder."""
    if option is None:
        return default_model_cache(env)
    return None if option.strip().lower() in ("", "none", "off") else option


def _cpu_threads(option: int | None, env: Mapping[str, str]) -> int | None:
    """``--cpu-threads``, else ``OMP_NUM_THREADS`` where it is a positive count (torch's own default reads it), else
    None: every CPU the process may run on (:func:`~amulet_core.model.loading.serving_cpu_threads`)."""
    if option is not None:
        return option
    value = env.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def configure_logging(log_level: str) -> None:
    """The root logger at ``--log-level`` (``trace`` is uvicorn's; the rest of the process logs DEBUG then)."""
    level = "DEBUG" if log_level == "trace" else log_level.upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
