"""amulet-eval's input side on hand-made data: verdict parsing, judge pairing, question sets, the JSONL store, CLI parsing."""

from __future__ import annotations

import json
import os
from itertools import combinations
from pathlib import Path

import pytest

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, PRESETS, Placement
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.gguf_cache import default_model_cache
from amulet_eval.cli import parse_args
from amulet_eval.config import FluencyConfig, HttpBackend, LocalBackend
from amulet_eval.judge import Pair, _verdict_row, judge_pairs, parse_verdict
from amulet_eval.questions import QuestionSetError, load_questions, parse_questions
from amulet_eval.store import append_rows, read_rows

# ---------------------------------------------------------------- judge verdicts


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("[[A]]", "A"),
        ("The second is better: [[B]]", "B"),
        ("[[tie]]", "tie"),
        ("A", "A"),
        ("B.", "B"),
        ("**B**", "B"),
        ("Verdict: A", "A"),
        ("Answer B\nIt is shorter.", "B"),
        ("TIE", "tie"),
        ("[[A]] or maybe [[B]]", None),
        ("Hello, wörld! 你好 🙂 ça va?", None),
        ("I prefer A over B", None),
        ("", None),
    ],
)
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_verdict_maps_the_shown_order_back_to_methods() -> None:
    pair = Pair(3, "concise", "amulet", "base")
    assert _verdict_row(pair, True, "[[A]]", "j")["winner"] == "amulet"
    assert _verdict_row(pair, False, "[[A]]", "j")["winner"] == "base"
    assert _verdict_row(pair, False, "[[B]]", "j")["winner"] == "amulet"
    row = _verdict_row(pair, True, "no idea", "j")
    assert row["winner"] is None and row["parsed"] is False
    assert _verdict_row(pair, True, "[[TIE]]", "j")["parsed"] is True


def test_judge_order_is_seeded_and_both_orders_occur() -> None:
    pairs = [Pair(i, "concise", "amulet", "base") for i in range(40)]
    first = [p.a_first(0) for p in pairs]
    assert first == [p.a_first(0) for p in pairs]
    assert 5 < sum(first) < 35
    assert first != [p.a_first(1) for p in pairs]


def test_judge_pairs_against_base_or_all() -> None:
    rows = {(i, "p", m): {} for i in range(2) for m in ("base", "la", "amulet")}
    assert [(p.method_a, p.method_b) for p in judge_pairs(rows, ["base", "la", "amulet"], False)] == [
        ("la", "base"),
        ("amulet", "base"),
    ] * 2
    assert len(judge_pairs(rows, ["base", "la", "amulet"], True)) == 2 * len(list(combinations(range(3), 2)))


# ---------------------------------------------------------------- questions, store, CLI


def test_demo_questions_ship_with_the_package() -> None:
    questions = load_questions(None)
    assert len(questions) == 12
    assert [q.index for q in questions] == list(range(12))
    assert load_questions(None, limit=2) == questions[:2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"index": "0", "question": "q"}]', "'index'"),
        ('[{"index": 0, "question": "  "}]', "'question'"),
        ('[{"index": 0, "question": "a"}, {"index": 0, "question": "b"}]', "appears twice"),
        ("[1]", "not an object"),
    ],
)
def test_bad_question_sets_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(QuestionSetError, match=message):
        parse_questions(text, "q.json")


def test_missing_question_file(tmp_path: Path) -> None:
    with pytest.raises(QuestionSetError, match="Cannot read"):
        load_questions(tmp_path / "nope.json")


def test_store_survives_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    with append_rows(path) as writer:
        writer.write({"a": 1})
    with path.open("a") as f:
        f.write('{"a": 2, "cut')  # killed mid-write
    rows, skipped = read_rows(path)
    assert rows == [{"a": 1}] and skipped == 1
    with append_rows(path) as writer:
        writer.write({"a": 3})
    rows, skipped = read_rows(path)
    assert rows == [{"a": 1}, {"a": 3}] and skipped == 1
    assert json.loads(path.read_text().splitlines()[-1]) == {"a": 3}


def test_cli_defaults_are_the_products_and_paper_is_the_papers() -> None:
    config = parse_args([], environ={})
    gen = config.generation
    assert gen.system_prompt == PAPER_SYSTEM_PROMPT and gen.default_system_prompt == "template"
    assert gen.preference_placement is Placement.END  # the server's default
    assert gen.identity("m")["preference_placement"] == "end"
    assert gen.max_tokens == 128 and gen.temperature == 0.0
    assert gen.preferences == PRESETS
    assert [m.label for m in gen.methods] == ["base", "pref", "la", "amulet"]
    amulet = gen.methods[3].engine_settings
    assert amulet == MethodSettings()  # the server's defaults, plausibility mask on
    assert amulet.method is Method.AMULET and amulet.plausibility == 0.5 and amulet.iterations == 60
    assert config.backend == LocalBackend(model_cache=default_model_cache({}))
    assert config.fluency == FluencyConfig(model_cache=default_model_cache({}))
    assert config.reward is None and config.judge is None and config.questions_path is None

    paper = parse_args(["--paper"], environ={}).generation
    assert [m.label for m in paper.methods] == ["base", "pref", "la", "amulet"]
    assert [m.engine_settings for m in paper.methods] == [MethodSettings.paper(m) for m in ("base", "pref", "la", "amulet")]
    assert paper.methods[3].engine_settings.plausibility == 0.0 and paper.system_prompt == PAPER_SYSTEM_PROMPT
    assert paper.max_tokens == 128 and paper.temperature == 0.0
    assert paper.preference_placement is Placement.SYSTEM  # the paper's, as the server's paper mode
    assert paper.identity("m")["preference_placement"] == "system"


@pytest.mark.parametrize(
    "deviation", [["--max-tokens", "64"], ["--no-system-prompt"], ["--plausibility", "0.1"], ["--coefficient", "3"]]
)
def test_paper_refuses_settings_that_are_not_the_papers(deviation: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--paper", *deviation], environ={})
    assert deviation[0] in capsys.readouterr().err


def test_strength_and_plausibility_columns() -> None:
    gen = parse_args(["--methods", "base", "amulet", "--plausibility", "0,0.5", "--coefficient", "3"], environ={}).generation
    assert [m.label for m in gen.methods] == ["base", "amulet-A3-p0", "amulet-A3"]
    assert [m.engine_settings.effective_strength for m in gen.methods[1:]] == [3.0, 3.0]
    assert parse_args(["--base-url", "http://x/v1"], environ={}).fluency is None
    assert parse_args(["--no-fluency"], environ={}).fluency is None
    assert parse_args(["--base-url", "http://x/v1", "--fluency-model", "embedded"], environ={}).fluency == FluencyConfig(
        device="cpu", model_cache=default_model_cache({})
    )


def test_cli_options() -> None:
    config = parse_args(
        [
            "--preferences", "Concise", "Answer like a pirate.", "concise",
            "--methods", "base", "amulet", "beam16",
            "--plausibility", "0,0.1",
            "--max-tokens", "24",
            "--no-system-prompt",
            "--judge-base-url", "http://127.0.0.1:1/v1",
        ],
        environ={"AMULET_JUDGE_API_KEY": "k"},
    )  # fmt: skip
    gen = config.generation
    assert gen.preferences == ("concise", "Answer like a pirate.")
    assert [m.label for m in gen.methods] == ["base", "amulet-p0", "amulet-p0.1", "beam16"]
    assert gen.methods[2].engine_settings.plausibility == 0.1
    assert gen.system_prompt == "" and gen.max_tokens == 24
    assert config.judge is not None and config.judge.api_key == "k" and not config.judge.all_pairs
    http = parse_args(["--base-url", "http://127.0.0.1:1/v1"], environ={"AMULET_API_KEY": "s"})
    assert http.backend == HttpBackend("http://127.0.0.1:1/v1", None, "s")


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "beam16", "--base-url", "http://x/v1"],
        ["--methods", "nope"],
        ["--plausibility", "1.5"],
        ["--plausibility", "abc"],
        ["--preferences", " "],
        ["--max-tokens", "0"],
        ["--cpu-threads", "0"],
        ["--limit", "0"],
        ["--model", "m", "--base-url", "http://x/v1"],
    ],
)
def test_cli_refuses_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ={})
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_in_process_eval_uses_every_core_unless_told() -> None:
    from amulet_eval.runner_local import LocalRunner

    config = parse_args([], environ={})
    assert LocalRunner(config.backend, config.generation).model_config.cpu_threads == (os.cpu_count() or 1)
    config = parse_args(["--cpu-threads", "1"], environ={})
    assert LocalRunner(config.backend, config.generation).model_config.cpu_threads == 1
