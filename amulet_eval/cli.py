"""``amulet-eval``: every option parsed here, once, into the frozen EvalConfig; then the pipeline runs."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence

from amulet_core.errors import AmuletError, InvalidParameterError
from amulet_core.method.preference_prompts import (
    PAPER_SYSTEM_PROMPT,
    PRESETS,
    Placement,
    preference_sentence,
)
from amulet_core.method.settings import Mode
from amulet_core.model.gguf_cache import default_model_cache
from amulet_eval.conditions import parse_condition
from amulet_eval.config import (
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
from amulet_eval.options import (
    API_KEY_ENV,
    JUDGE_API_KEY_ENV,
    PAPER_MAX_TOKENS,
    PAPER_METHODS,
    build_parser,
)
from amulet_eval.questions import QuestionSetError
from amulet_eval.report import command_line


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
