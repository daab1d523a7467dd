"""Question sets in the paper's format: a JSON list of ``{"index": int, "question": str}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class QuestionSetError(ValueError):
    """The question file is missing or not in the expected format."""


@dataclass(frozen=True)
class Question:
    index: int
    question: str


DEMO_NAME = "demo_questions.json"


def demo_questions_text() -> str:
    """The small everyday question set shipped with the package (written for this project)."""
    return resources.files("amulet_eval").joinpath("data", DEMO_NAME).read_text(encoding="utf-8")


def parse_questions(text: str, source: str) -> tuple[Question, ...]:
    """Validate and parse a question set; raises QuestionSetError with the offending entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuestionSetError(f"{source}: not valid JSON ({exc}).") from None
    if not isinstance(data, list) or not data:
        raise QuestionSetError(f"{source}: expected a non-empty JSON list of {{'index', 'question'}} objects.")
    questions: list[Question] = []
    seen: set[int] = set()
    for position, item in enumerate(data):
        where = f"{source}: entry {position}"
        if not isinstance(item, dict):
            raise QuestionSetError(f"{where} is not an object.")
        index, question = item.get("index"), item.get("question")
        if isinstance(index, bool) or not isinstance(index, int):
            raise QuestionSetError(f"{where}: 'index' must be a whole number, got {index!r}.")
        if not isinstance(question, str) or not question.strip():
            raise QuestionSetError(f"{where}: 'question' must be a non-empty string.")
        if index in seen:
            raise QuestionSetError(f"{where}: index {index} appears twice.")
        seen.add(index)
        questions.append(Question(index, question.strip()))
    return tuple(questions)


def load_questions(path: Path | None, limit: int | None = None) -> tuple[Question, ...]:
    """The questions of ``path`` (None: the demo set), the first ``limit`` of them when given."""
    if path is None:
        questions = parse_questions(demo_questions_text(), DEMO_NAME)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise QuestionSetError(f"Cannot read the question file {str(path)!r}: {exc.strerror or exc}.") from None
        questions = parse_questions(text, str(path))
    return questions if limit is None else questions[:limit]
