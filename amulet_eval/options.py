"""The options of ``amulet-eval`` (:func:`build_parser`), which :func:`amulet_eval.cli.parse_args` reads into the
frozen EvalConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, PRESETS, TEMPLATE, Placement
from amulet_eval.config import ALL_METHODS, BEAM_METHOD, CFG_METHOD, ENGINE_METHODS

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
