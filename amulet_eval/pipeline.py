"""One evaluation run, end to end: questions -> answers (resumable) -> scores -> comparisons -> report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_sentence
from amulet_eval.conditions import parse_condition
from amulet_eval.config import BASELINE, CFG_METHOD, EvalConfig, FluencyConfig, GenerationConfig, HttpBackend
from amulet_eval.generate import GenerationSummary, Runner, run_generation
from amulet_eval.judge import run_judge
from amulet_eval.quality import FluencyScorer, pooled_quality
from amulet_eval.questions import DEMO_NAME, load_questions
from amulet_eval.report import write_report
from amulet_eval.results import judge_results, score_results
from amulet_eval.scoring import (
    answer_quality,
    degenerate_score_set,
    fluency_score_set,
    length_score_set,
    proxy_metrics,
    proxy_preferences,
    proxy_score_set,
    reward_score_set,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOutcome:
    generation: GenerationSummary
    results: dict[str, Any]
    files: dict[str, Path]


def make_runner(config: EvalConfig) -> Runner:
    if isinstance(config.backend, HttpBackend):
        from amulet_eval.runner_http import HttpRunner

        return HttpRunner(config.backend, config.generation)
    from amulet_eval.runner_local import LocalRunner

    return LocalRunner(config.backend, config.generation)


def _decoding(config: EvalConfig) -> str:
    gen = config.generation
    if gen.system_prompt == PAPER_SYSTEM_PROMPT:
        prompt = "the paper's system prompt"
    else:
        prompt = "a custom system prompt" if gen.system_prompt else "no system prompt"
    sampling = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature:g}, seed {gen.seed}"
    return f"{prompt}, up to {gen.max_tokens} new tokens, {sampling}"


def setting_notes(gen: GenerationConfig) -> list[str]:
    """What the report says about joined conditions, negatives and cfg, so that no column or row hides a setting."""
    notes = []
    for pref in gen.preferences:
        condition = parse_condition(pref)
        if condition.joined:
            weights = "equal weights" if len(set(condition.weights)) == 1 else f"weights {list(condition.weights)}"
            notes.append(
                f"`{pref}`: one condition of {len(condition.texts)} preference contexts ({weights}, normalised); "
                "its proxy rows score each member's metric on the same answers (`<condition> [<member>]`)."
            )
    for spec in gen.methods:
        if spec.kind == CFG_METHOD:
            notes.append(
                f"`{spec.label}`: classifier-free guidance, g = {spec.engine_settings.strength:g}, negative prompt "
                f"{preference_sentence(spec.negative or '')!r}. It ignores the row's preference (the positive context is "
                "the conversation as given), so like base it decodes the same contexts under every preference (answers "
                "may still differ with the batch's numerics, as base's may); each row scores them by its own metric."
            )
        elif spec.negative is not None:
            notes.append(f"`{spec.label}`: the contrast context carries {preference_sentence(spec.negative)!r}.")
    return notes


def ended_before_limit(rows: dict[Any, dict[str, Any]], prefs: list[str], methods: list[str]) -> dict[str, dict[str, float]]:
    """Per preference and method, the share of answers that ended (EOS or stop) before the token limit."""
    out: dict[str, dict[str, float]] = {}
    for pref in prefs:
        for method in methods:
            cell = [r for (_, p, m), r in rows.items() if p == pref and m == method]
            if cell:
                out.setdefault(pref, {})[method] = sum(r.get("finish_reason") == "stop" for r in cell) / len(cell)
    return out


def fluency_scorer(config: FluencyConfig | None) -> FluencyScorer | None:
    """A plain copy of the scoring model, outside any engine (None when fluency is off)."""
    if config is None:
        return None
    from amulet_core.model.loading import ModelConfig, load_model

    return FluencyScorer(
        load_model(ModelConfig(model=config.model, device=config.device, dtype=config.dtype, model_cache=config.model_cache))
    )


def run_eval(config: EvalConfig, runner: Runner | None = None) -> EvalOutcome:
    gen = config.generation
    questions = load_questions(config.questions_path, config.limit)
    runner = runner or make_runner(config)
    summary = run_generation(config.out_dir, questions, gen, runner, config.progress)
    rows = summary.rows
    methods = [m.label for m in gen.methods]
    prefs = list(gen.preferences)
    alpha = config.bt_regularization
    model = next(iter(rows.values()))["run"]["model"] if rows else "?"

    metrics = proxy_metrics(rows)
    scorers: dict[str, Any] = {
        "words": score_results(length_score_set(metrics), prefs, methods, BASELINE, alpha, compare=False),
        "proxy": score_results(proxy_score_set(rows, metrics), proxy_preferences(prefs), methods, BASELINE, alpha),
    }
    fluency, degeneration = answer_quality(rows, gen.system_prompt, fluency_scorer(config.fluency), config.progress)
    degenerate = {k: float(bool(reasons)) for k, reasons in degeneration.items()}
    if fluency:
        scorers["fluency"] = score_results(fluency_score_set(fluency), prefs, methods, BASELINE, alpha, compare=False)
    scorers["degenerate"] = score_results(degenerate_score_set(degenerate), prefs, methods, BASELINE, alpha, compare=False)
    reward_values: dict[Any, float] = {}
    if config.reward is not None:
        from amulet_eval.reward_model import RewardModel

        reward_set = reward_score_set(rows, RewardModel.load(config.reward), config.progress)
        reward_values = reward_set.values
        scorers["reward"] = score_results(reward_set, prefs, methods, BASELINE, alpha)
    judgments: list[dict[str, Any]] = []
    if config.judge is not None:
        judgments = run_judge(config.judge, rows, methods, config.out_dir, config.progress)
        label = f"LLM judge ({judgments[0]['judge_model'] if judgments else config.judge.model or 'endpoint model'})"
        scorers["judge"] = judge_results(judgments, prefs, methods, BASELINE, alpha, label)

    backend = f"HTTP {config.backend.base_url}" if isinstance(config.backend, HttpBackend) else "in-process engine"
    results = {
        "run": {
            "model": model,
            "backend": backend,
            "questions": len(questions),
            "question_source": str(config.questions_path) if config.questions_path else f"the demo set ({DEMO_NAME})",
            "preferences": prefs,
            "methods": methods,
            "method_settings": {m.label: m.describe() for m in gen.methods},
            "notes": setting_notes(gen),
            "baseline": BASELINE,
            "decoding": _decoding(config),
            "system_prompt": gen.system_prompt,
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "seed": gen.seed,
            "bt_regularization": alpha,
            "command": config.command,
            "generated_now": summary.generated,
            "reused": summary.reused,
        },
        "scorers": scorers,
        "ended_before_limit": ended_before_limit(rows, prefs, methods),
        "quality": {
            "fluency_model": (config.fluency.model or "embedded") if config.fluency else None,
            "by_method": pooled_quality(fluency, degenerate, methods),
        },
        "rows": [
            {
                "index": k[0],
                "preference": k[1],
                "method": k[2],
                "completion_tokens": row.get("completion_tokens"),
                "finish_reason": row.get("finish_reason"),
                **metrics[k],
                "fluency": fluency.get(k),
                "degeneration": degeneration[k],
                **({"reward": reward_values[k]} if k in reward_values else {}),
            }
            for k, row in sorted(rows.items())
        ],
        "judgments": judgments,
    }
    files = write_report(results, config.out_dir, config.charts)
    return EvalOutcome(summary, results, files)
