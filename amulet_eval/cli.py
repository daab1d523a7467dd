"""``amulet-eval``: every option parsed here, once, into the frozen EvalConfig; then the pipeline runs."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from amulet_core.errors import AmuletError, InvalidParameterError
from amulet_core.method.preference_prompts import (
    PAPER_SYSTEM_PROMPT,
    PRESETS,
    TEMPLATE,
    Placement,
    preference_sentence,
)
from amulet_core.method.settings import Mode
from amulet_core.model.gguf_cache import default_model_cache
from amulet_eval.conditions import parse_condition
from amulet_eval.config import (
    ALL_METHODS,
    BEAM_METHOD,
    CFG_METHOD,
    CONTRAST_METHODS,
    ENGINE_METHODS,
    EvalConfig,
    FluencyConfig,
    GenerationConfig,
    HttpBackend,
    JudgeConfig,
    LocalBackend,
    RewardConfig,
    method_specs,
)
from amulet_eval.generate import GenerationError, SettingsMismatchError
from amulet_eval.interrupt import INTERRUPTED, CtrlC, exit_now
from amulet_eval.judge import JudgeError
from amulet_eval.questions import QuestionSetError
from amulet_eval.report import command_line

API_KEY_ENV = "AMULET_API_KEY"
JUDGE_API_KEY_ENV = "AMULET_JUDGE_API_KEY"
DEFAULT_OUT = "eval_runs/default"
PAPER_METHODS = ("base", "pref", "la", "amulet")
PAPER_MAX_TOKENS = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amulet-eval",
        description="Run a question set through the decoding methods under each preference, score the answers "
        "(proxy metrics, optionally a reward model and an LLM judge), compare the methods and write a report. "
        "Resumable: a rerun with the same --out skips the answers already generated.",
    )
    g = p.add_argument_group("questions and output")
    g.add_argument("--questions", type=Path, default=None, help="JSON list of {index, question} (default: the demo set)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    g.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder (default: %(default)s)")
    g = p.add_argument_group("what to compare")
    g.add_argument(
        "--preferences",
        nargs="+",
        default=list(PRESETS),
        metavar="PREF",
        help="preset names or free text (quote it), one row each; presets joined by + make one multi-preference "
        "row, e.g. concise+formal (+ joins preset names only; other text stays one free-text preference): one "
        "preference context per preset, equal weights, or name:weight to weigh them "
        "(concise:2+formal; only the ratio matters; over --base-url at most the server's --max-preferences, 4 by "
        "default); its proxy scores are each member's "
        "own metric on the same answers, one row per member (concise+formal [concise]: words, "
        "concise+formal [formal]: reading grade) (default: the 8 presets)",
    )
    g.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=ALL_METHODS,
        metavar="METHOD",
        help=f"any of {', '.join(ALL_METHODS)}; {BEAM_METHOD} is the paper's 16-beam search on the pref context, "
        f"in-process only, one preference per row; {CFG_METHOD} is classifier-free guidance (needs --guidance-scale "
        f"and --negative-prompt) (default: {' '.join(ENGINE_METHODS)})",
    )
    g.add_argument(
        "--negative",
        nargs="+",
        default=None,
        metavar="NEG",
        help="a preset or sentence the contrast context of la and amulet carries instead of nothing (the "
        "server's preference.negative), so they extrapolate from it toward the row's preference; several give "
        "one la/amulet column each, labelled e.g. amulet-vs-concise (free text: amulet-vs-neg<6 hex digits of "
        "its hash>); 'none' is the plain contrast context, labelled as before (default: none)",
    )
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        metavar="G",
        help=f"the {CFG_METHOD} column's guidance scale (the server's guidance_scale): the answer decodes from "
        "g * l_conversation + (1 - g) * l_negative, no plausibility mask; 1 is plain decoding",
    )
    g.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help=f"the {CFG_METHOD} column's negative prompt (a preset or sentence, appended to the system message of "
        f"the contrast context). {CFG_METHOD} ignores the row's preference: its positive context is the "
        "conversation as given, so, like base, it decodes the same contexts under every preference row, and "
        "each row scores its answers by its own metric",
    )
    g.add_argument(
        "--plausibility",
        default=None,
        metavar="BETA[,BETA...]",
        help="plausibility mask for amulet, in [0, 1); several values give one amulet column each, "
        "labelled amulet-pBETA (default: the server's default; 0 with --paper)",
    )
    g.add_argument(
        "--coefficient",
        default=None,
        metavar="A[,A...]",
        help="strength A of amulet set directly instead of by the game; several values give one column each, "
        "labelled amulet-AA (default: the game's A)",
    )
    g.add_argument(
        "--paper",
        action="store_true",
        help="the paper's exact settings: its system prompt, T=60 eta=10 alpha=2 lambda=2 (A=5.65), la ratio 2, "
        "no mask, 128 greedy tokens, methods base pref la amulet",
    )
    g = p.add_argument_group("decoding (the paper's defaults)")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed when temperature > 0 (default: %(default)s)")
    g.add_argument("--system-prompt", default=PAPER_SYSTEM_PROMPT, help="system prompt (default: the paper's)")
    g.add_argument("--no-system-prompt", action="store_true", help="no system prompt")
    g.add_argument(
        "--default-system-prompt",
        default=TEMPLATE,
        metavar="template|paper|none|TEXT",
        help="in-process runs: the system message a preference request without one gets, as the server's option "
        "of that name (over --base-url the server's own setting applies) (default: %(default)s)",
    )
    g.add_argument(
        "--preference-placement",
        default=None,
        choices=[p.value for p in Placement],
        help="in-process runs: where the preference sentences (and a negative one) go, the system message or the "
        "last user message, as the server's option of that name (over --base-url the server's own setting "
        f"applies) (default: the server's, {Placement.END.value}; {Placement.SYSTEM.value} with --paper, as the "
        "server's paper mode)",
    )
    g.add_argument("--concurrency", type=int, default=8, help="answers generated at once (default: %(default)s)")
    g = p.add_argument_group("in-process engine (default)")
    g.add_argument("--model", default=None, help="HF model folder or cached id, or .gguf (default: embedded SmolLM2-135M)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--max-model-len", type=int, default=2048, help="longest prompt plus answer (default: %(default)s)")
    g.add_argument("--cpu-threads", type=int, default=None, help="torch threads on the CPU (default: every core)")
    g = p.add_argument_group("running server instead")
    g.add_argument("--base-url", default=None, help="OpenAI API of a running Amulet Serve, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model-name", default=None, help="model name to send (default: the first of GET /models)")
    g.add_argument("--api-key", default=None, help=f"bearer key for --base-url (default: ${API_KEY_ENV})")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP call (default: %(default)s)")
    g = p.add_argument_group("fluency")
    g.add_argument(
        "--fluency-model",
        default=None,
        help="model that scores fluency, loaded in this process: a HF folder or cached id, a .gguf file, or 'embedded' "
        "(default: the in-process model; over --base-url fluency is only measured with this option)",
    )
    g.add_argument("--no-fluency", action="store_true", help="do not measure fluency (degeneration then uses text rules)")
    g = p.add_argument_group("reward model (optional)")
    g.add_argument("--reward-model", type=Path, default=None, help="local HF sequence-classification reward model folder")
    g.add_argument("--reward-device", default="auto")
    g.add_argument("--reward-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--reward-trust-remote-code", action="store_true", help="allow the folder's own model code (ArmoRM)")
    g.add_argument("--reward-max-length", type=int, default=4096, help="tokens kept per scored input")
    g = p.add_argument_group("pairwise LLM judge (optional)")
    g.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of the judge (ends in /v1)")
    g.add_argument("--judge-model", default=None, help="judge model name (default: the first of GET /models)")
    g.add_argument("--judge-api-key", default=None, help=f"bearer key for the judge (default: ${JUDGE_API_KEY_ENV})")
    g.add_argument("--judge-all-pairs", action="store_true", help="judge every pair of methods, not only each against base")
    g.add_argument("--judge-seed", type=int, default=0, help="seed of the answer order shown to the judge")
    g.add_argument("--judge-max-tokens", type=int, default=16, help="tokens of the judge's reply (default: %(default)s)")
    g.add_argument("--judge-concurrency", type=int, default=4)
    g = p.add_argument_group("report")
    g.add_argument("--bt-alpha", type=float, default=0.01, help="Bradley-Terry L2 regularization (default: %(default)s)")
    g.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return p


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _preference(text: str) -> str:
    preference_sentence(text)  # validates (non-empty, not too long)
    stripped = text.strip()
    return stripped.lower() if stripped.lower() in PRESETS else stripped


def _placement(given: str | None, paper: bool) -> Placement:
    """As the server decides: the option when given; else the paper's (system) with --paper; else the server's
    default (end)."""
    if given is not None:
        return Placement(given)
    return Placement.SYSTEM if paper else Placement.END


def _negatives(texts: Sequence[str] | None) -> tuple[str | None, ...]:
    """The --negative values: presets lower-cased, free text stripped, 'none' as None; (None,) when not given."""
    if texts is None:
        return (None,)
    return tuple(dict.fromkeys(None if t.strip().lower() == "none" else _preference(t) for t in texts))


def _numbers(option: str, text: str | None) -> tuple[float | None, ...]:
    """Comma-separated numbers of an option; (None,) when it is not given (the mode's default)."""
    if text is None:
        return (None,)
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidParameterError(option, f"--{option} takes comma-separated numbers, got {text!r}.") from None
    if not values:
        raise InvalidParameterError(option, f"--{option} needs at least one value.")
    return tuple(dict.fromkeys(values))


def _fluency(args: argparse.Namespace, model_cache: str | None) -> FluencyConfig | None:
    if args.no_fluency:
        return None
    if args.fluency_model is not None:
        model = None if args.fluency_model == "embedded" else args.fluency_model
        return FluencyConfig(model=model, device="cpu" if args.base_url is not None else args.device, model_cache=model_cache)
    if args.base_url is not None:
        return None
    return FluencyConfig(model=args.model, device=args.device, model_cache=model_cache)


def _guidance(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: bool) -> tuple[float, str] | None:
    """(guidance scale, negative prompt) of the cfg column; both go with cfg in --methods, and only with it."""
    given = [
        name
        for name, value in (("--guidance-scale", args.guidance_scale), ("--negative-prompt", args.negative_prompt))
        if value is not None
    ]
    if not cfg:
        if given:
            parser.error(f"{' and '.join(given)} set the {CFG_METHOD} column; add {CFG_METHOD} to --methods.")
        return None
    if len(given) < 2:
        parser.error(f"{CFG_METHOD} needs --guidance-scale and --negative-prompt.")
    scale = float(args.guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        parser.error(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}.")
    return scale, _preference(args.negative_prompt)  # validated there (non-empty, not too long)


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> EvalConfig:
    """The whole configuration; exits with a usage error on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    model_cache = default_model_cache(env)
    for name in ("limit", "max_tokens", "concurrency", "max_model_len", "cpu_threads", "judge_max_tokens", "judge_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.base_url is not None and BEAM_METHOD in (args.methods or ()):
        parser.error(f"{BEAM_METHOD} runs in-process only (transformers beam search); drop it or drop --base-url.")
    if args.base_url is not None and args.model is not None:
        parser.error("--model loads a model in-process; with --base-url name the served model with --model-name.")
    if args.bt_alpha <= 0:
        parser.error("--bt-alpha must be greater than 0.")
    if args.paper:
        deviations = {
            "--no-system-prompt": args.no_system_prompt,
            "--system-prompt": args.system_prompt != PAPER_SYSTEM_PROMPT,
            "--max-tokens": args.max_tokens != PAPER_MAX_TOKENS,
            "--temperature": args.temperature != 0,
            "--plausibility": args.plausibility is not None,
            "--coefficient": args.coefficient is not None,
            "--negative": args.negative is not None,
            "--preference-placement": args.preference_placement not in (None, Placement.SYSTEM.value),
        }
        given = [name for name, deviates in deviations.items() if deviates]
        if given:
            parser.error(f"--paper runs the paper's exact settings; drop {', '.join(given)}.")
    try:
        conditions = [parse_condition(p) for p in args.preferences]
        preferences = _unique([c.label for c in conditions])
        mode = Mode.PAPER if args.paper else Mode.DEFAULT
        names = PAPER_METHODS if args.paper and args.methods is None else _unique(args.methods or ENGINE_METHODS)
        if BEAM_METHOD in names and any(c.joined for c in conditions):
            parser.error(f"{BEAM_METHOD} decodes one pref context; drop it or the joined preferences (A+B).")
        negatives = _negatives(args.negative)
        if negatives != (None,) and not CONTRAST_METHODS & set(names):
            parser.error("--negative fills the contrast context of la and amulet; choose one of them in --methods.")
        guidance = _guidance(parser, args, CFG_METHOD in names)
        strengths = _numbers("coefficient", args.coefficient)
        plausibilities = _numbers("plausibility", args.plausibility)
        methods = method_specs(names, plausibilities, strengths, mode, negatives, guidance)
        generation = GenerationConfig(
            methods=methods,
            preferences=preferences,
            system_prompt="" if args.no_system_prompt else args.system_prompt,
            default_system_prompt=args.default_system_prompt,
            preference_placement=_placement(args.preference_placement, args.paper),
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            concurrency=args.concurrency,
        )
    except InvalidParameterError as exc:
        parser.error(exc.message)
    if not 0 <= args.temperature <= 100:
        parser.error(f"--temperature must be from 0 to 100, got {args.temperature}.")
    backend: LocalBackend | HttpBackend
    if args.base_url is not None:
        api_key = args.api_key if args.api_key is not None else env.get(API_KEY_ENV) or None
        backend = HttpBackend(args.base_url, args.model_name, api_key, args.timeout)
    else:
        backend = LocalBackend(args.model, args.device, args.dtype, args.max_model_len, args.cpu_threads, model_cache)
    reward = None
    if args.reward_model is not None:
        reward = RewardConfig(
            args.reward_model, args.reward_device, args.reward_dtype, args.reward_trust_remote_code, args.reward_max_length
        )
    judge = None
    if args.judge_base_url is not None:
        key = args.judge_api_key if args.judge_api_key is not None else env.get(JUDGE_API_KEY_ENV) or None
        judge = JudgeConfig(
            args.judge_base_url,
            args.judge_model,
            key,
            args.judge_seed,
            args.judge_all_pairs,
            args.judge_max_tokens,
            args.judge_concurrency,
            args.timeout,
        )
    return EvalConfig(
        questions_path=args.questions,
        limit=args.limit,
        out_dir=args.out,
        generation=generation,
        backend=backend,
        fluency=_fluency(args, model_cache),
        reward=reward,
        judge=judge,
        bt_regularization=args.bt_alpha,
        charts=not args.no_charts,
        progress=not args.no_progress,
        command=command_line(sys.argv[1:] if argv is None else argv),
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; 0 when done, 2 on an error, INTERRUPTED after Ctrl-C (amulet_eval.interrupt)."""
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        with CtrlC():
            from amulet_eval.pipeline import run_eval

            outcome = run_eval(config)
    except KeyboardInterrupt:
        print(f"\namulet-eval: interrupted; every answer finished so far is kept in {config.out_dir}.", file=sys.stderr)
        return INTERRUPTED
    except (QuestionSetError, SettingsMismatchError, GenerationError, JudgeError, AmuletError) as exc:
        print(f"amulet-eval: error: {exc}", file=sys.stderr)
        return 2
    summary = outcome.generation
    print(f"answers: {summary.generated} generated now, {summary.reused} reused from {config.out_dir}")
    for name, path in outcome.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    code = main()
    if code == INTERRUPTED:
        exit_now(code)
    sys.exit(code)
