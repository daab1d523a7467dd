"""Generation: every (question, preference, method) once, resumably, through a Runner.

Rows already in ``generations.jsonl`` with the same key and settings are skipped; each new answer
is appended (and synced) as soon as it is done, so Ctrl-C loses nothing already generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from amulet_eval.aio import run, run_pool
from amulet_eval.conditions import Condition, parse_condition
from amulet_eval.config import GenerationConfig, MethodSpec
from amulet_eval.questions import Question
from amulet_eval.store import Row, append_rows, read_rows

GENERATIONS_FILE = "generations.jsonl"

Key = tuple[int, str, str]


class GenerationError(RuntimeError):
    """A backend could not produce an answer (the run stops; finished rows are kept)."""


class SettingsMismatchError(ValueError):
    """The output folder holds rows for the same key made with other settings."""


@dataclass(frozen=True)
class Job:
    question: Question
    preference: str
    """The condition's label: one preference, or presets joined by ``+`` (amulet_eval.conditions)."""
    method: MethodSpec

    @property
    def key(self) -> Key:
        return (self.question.index, self.preference, self.method.label)

    @property
    def condition(self) -> Condition:
        """The preference texts and weights the label stands for."""
        return parse_condition(self.preference)


@dataclass(frozen=True)
class Generated:
    text: str
    completion_tokens: int
    finish_reason: str


class Runner(Protocol):
    serial_kinds: frozenset[str]
    """Method kinds that must run alone (one at a time, after the others)."""

    async def resolve_model_name(self) -> str: ...

    async def start(self) -> None: ...

    async def generate(self, job: Job) -> Generated: ...

    async def close(self) -> None: ...


def conversation(system_prompt: str, question: str) -> list[dict[str, str]]:
    """The conversation every method answers: the system prompt (when not empty) and the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": question}]


def row_key(row: Row) -> Key:
    return (int(row["index"]), str(row["preference"]), str(row["method"]))


def plan(questions: Sequence[Question], generation: GenerationConfig) -> list[Job]:
    return [Job(q, p, m) for q in questions for p in generation.preferences for m in generation.methods]


@dataclass(frozen=True)
class GenerationSummary:
    rows: dict[Key, Row]
    """The rows of this run's jobs, by key."""
    generated: int
    reused: int
    skipped_lines: int


def _row(job: Job, out: Generated, identity: dict[str, Any]) -> Row:
    return {
        "index": job.question.index,
        "preference": job.preference,
        "method": job.method.label,
        "question": job.question.question,
        "response": out.text,
        "completion_tokens": out.completion_tokens,
        "finish_reason": out.finish_reason,
        "run": identity,
        "method_settings": job.method.describe(),
    }


def split_done(jobs: Sequence[Job], rows: Sequence[Row], identity: dict[str, Any]) -> tuple[dict[Key, Row], list[Job]]:
    """(rows reusable for these jobs, jobs still to run); raises when a key was made with other settings."""
    by_key: dict[Key, Row] = {}
    for row in rows:
        try:
            by_key[row_key(row)] = row
        except (KeyError, TypeError, ValueError):
            continue
    done: dict[Key, Row] = {}
    todo: list[Job] = []
    for job in jobs:
        found = by_key.get(job.key)
        if found is None:
            todo.append(job)
            continue
        if found.get("run") != identity or found.get("method_settings") != job.method.describe():
            raise SettingsMismatchError(
                f"The output folder already has an answer for question {job.key[0]}, preference {job.key[1]!r}, "
                f"method {job.key[2]!r} made with other settings ({row.get('run')}, {row.get('method_settings')}) "
                f"than this run ({identity}, {job.method.describe()}). Use another --out folder."
            )
        done[job.key] = found
    return done, todo


async def _generate(todo: list[Job], runner: Runner, path: Path, identity: dict[str, Any], width: int, bar: tqdm) -> list[Row]:
    made: list[Row] = []
    try:
        await runner.start()
        with append_rows(path) as writer:

            async def work(job: Job) -> None:
                row = _row(job, await runner.generate(job), identity)
                writer.write(row)
                made.append(row)
                bar.update(1)

            await run_pool([j for j in todo if j.method.kind not in runner.serial_kinds], width, work)
            await run_pool([j for j in todo if j.method.kind in runner.serial_kinds], 1, work)
    finally:
        await runner.close()
    return made


def run_generation(
    out_dir: Path,
    questions: Sequence[Question],
    generation: GenerationConfig,
    runner: Runner,
    progress: bool = True,
) -> GenerationSummary:
    """Generate what is missing for ``questions`` x preferences x methods; return all their rows."""
    path = out_dir / GENERATIONS_FILE
    jobs = plan(questions, generation)
    existing, skipped_lines = read_rows(path)

    async def main() -> GenerationSummary:
        identity = generation.identity(await runner.resolve_model_name())
        done, todo = split_done(jobs, existing, identity)
        made: list[Row] = []
        if todo:
            with tqdm(total=len(jobs), initial=len(done), desc="generating", unit="answer", disable=not progress) as bar:
                made = await _generate(todo, runner, path, identity, generation.concurrency, bar)
        rows = dict(done)
        rows.update((row_key(r), r) for r in made)
        return GenerationSummary(rows, len(made), len(done), skipped_lines)

    return run(main())
