"""Generation is resumable: rows are keyed by (question index, preference, method), appended and synced one by
one, reused on a rerun, and kept when the run is interrupted. A scripted runner stands in for the model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from amulet_eval.config import BEAM_METHOD, GenerationConfig, method_specs
from amulet_eval.generate import (
    GENERATIONS_FILE,
    Generated,
    Job,
    SettingsMismatchError,
    run_generation,
)
from amulet_eval.questions import load_questions


class ScriptedRunner:
    """Answers each job with a text naming it; counts its calls; can raise after a number of answers."""

    serial_kinds = frozenset({BEAM_METHOD})

    def __init__(self, fail_after: int | None = None, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.fail_after = fail_after
        self.error = error
        self.calls: list[tuple[int, str, str]] = []
        self.started = self.closed = 0

    async def resolve_model_name(self) -> str:
        return "scripted"

    async def start(self) -> None:
        self.started += 1

    async def generate(self, job: Job) -> Generated:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise self.error()
        self.calls.append(job.key)
        await asyncio.sleep(0)
        return Generated(f"answer {job.key}", 3, "stop")

    async def close(self) -> None:
        self.closed += 1


def gen_config(methods=("base", "amulet"), preferences=("concise", "verbose"), max_tokens: int = 24, **kw) -> GenerationConfig:
    return GenerationConfig(
        methods=method_specs(tuple(methods), kw.pop("plausibilities", (None,))),
        preferences=tuple(preferences),
        max_tokens=max_tokens,
        **kw,
    )


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]


def test_rerun_skips_finished_rows(tmp_path: Path) -> None:
    questions = load_questions(None, limit=2)
    first = ScriptedRunner()
    summary = run_generation(tmp_path, questions, gen_config(), first, progress=False)
    assert summary.generated == 8 and summary.reused == 0 and len(first.calls) == 8
    assert first.started == first.closed == 1
    before = (tmp_path / GENERATIONS_FILE).read_text()
    keys = {(r["index"], r["preference"], r["method"]) for r in lines(tmp_path)}
    assert keys == {(q.index, p, m) for q in questions for p in ("concise", "verbose") for m in ("base", "amulet")}

    again = ScriptedRunner()
    summary = run_generation(tmp_path, questions, gen_config(), again, progress=False)
    assert summary.generated == 0 and summary.reused == 8
    assert again.calls == [] and again.started == 0  # nothing to do: the model is not even loaded
    assert (tmp_path / GENERATIONS_FILE).read_text() == before
    assert set(summary.rows) == keys


def test_a_larger_run_adds_only_the_new_rows(tmp_path: Path) -> None:
    run_generation(tmp_path, load_questions(None, limit=1), gen_config(), ScriptedRunner(), progress=False)
    more = ScriptedRunner()
    summary = run_generation(
        tmp_path, load_questions(None, limit=2), gen_config(methods=("base", "amulet", "la")), more, progress=False
    )
    assert summary.reused == 4 and summary.generated == 8
    assert sorted(more.calls) == sorted(
        [(1, p, m) for p in ("concise", "verbose") for m in ("base", "amulet", "la")]
        + [(0, p, "la") for p in ("concise", "verbose")]
    )
    assert len(lines(tmp_path)) == 12


def test_interrupt_keeps_every_finished_row_and_the_rerun_completes(tmp_path: Path) -> None:
    questions = load_questions(None, limit=2)
    interrupted = ScriptedRunner(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_generation(tmp_path, questions, gen_config(concurrency=1), interrupted, progress=False)
    assert interrupted.closed == 1
    kept = lines(tmp_path)
    assert [(r["index"], r["preference"], r["method"]) for r in kept] == interrupted.calls
    assert len(kept) == 3
    # A kill in the middle of a write leaves a partial line: it is skipped and the rest carries on.
    with (tmp_path / GENERATIONS_FILE).open("a") as f:
        f.write('{"index": 1, "prefer')
    rest = ScriptedRunner()
    summary = run_generation(tmp_path, questions, gen_config(concurrency=1), rest, progress=False)
    assert summary.reused == 3 and summary.generated == 5 and summary.skipped_lines == 1
    assert not set(rest.calls) & set(interrupted.calls)
    assert len(summary.rows) == 8


def test_a_failed_answer_stops_the_run_but_keeps_the_others(tmp_path: Path) -> None:
    runner = ScriptedRunner(fail_after=5, error=RuntimeError)
    with pytest.raises(RuntimeError):
        run_generation(tmp_path, load_questions(None, limit=2), gen_config(concurrency=4), runner, progress=False)
    assert len(lines(tmp_path)) == len(runner.calls) == 5
    assert runner.closed == 1


def test_rows_made_with_other_settings_are_not_mixed_in(tmp_path: Path) -> None:
    questions = load_questions(None, limit=1)
    run_generation(tmp_path, questions, gen_config(max_tokens=24), ScriptedRunner(), progress=False)
    with pytest.raises(SettingsMismatchError, match="other settings"):
        run_generation(tmp_path, questions, gen_config(max_tokens=32), ScriptedRunner(), progress=False)
    # Another plausibility makes a column of its own (amulet-p0.2), so it can be added next to amulet.
    runner = ScriptedRunner()
    summary = run_generation(tmp_path, questions, gen_config(plausibilities=(None, 0.2)), runner, progress=False)
    assert {k[2] for k in runner.calls} == {"amulet-p0.2"}
    assert summary.rows[(0, "concise", "amulet-p0.2")]["method_settings"]["plausibility"] == 0.2


def test_serial_methods_run_after_the_others(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    run_generation(
        tmp_path, load_questions(None, limit=2), gen_config(methods=("beam16", "base", "pref")), runner, progress=False
    )
    methods = [k[2] for k in runner.calls]
    assert methods[-4:] == ["beam16"] * 4 and "beam16" not in methods[:-4]
