"""amulet-eval over HTTP: the runner through a real server (fake engine) and the pairwise judge protocol.

The fake engine records what it is asked, so the tests check the exact contexts, method settings and
sampling each answer was decoded with, and what the judge was shown. It always replies with the
same greeting, which no judge prompt can parse as a verdict: those count as ties and are reported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_contexts, preference_sentence
from amulet_core.method.settings import Method
from amulet_eval.cli import main
from amulet_eval.config import EvalConfig, GenerationConfig, HttpBackend, JudgeConfig, method_specs
from amulet_eval.generate import conversation
from amulet_eval.judge import JUDGMENTS_FILE, run_judge
from amulet_eval.pipeline import run_eval
from amulet_eval.questions import load_questions
from server.config import ServerConfig
from tests.eval.ctrl_c import amulet_eval_argv, complete_rows
from tests.eval.expected_requests import LABELS, MEMBERS, METHODS, NEG_PROMPT, NEGATIVES, PREFERENCES, expected_requests
from tests.support.fake_engine import REPLY_PIECES, FakeEngine
from tests.support.http import API_KEY
from tests.support.live_server import LiveServer, free_port, wait_until

MODEL = "fake-model"
PLACEMENT = ServerConfig().preference_placement
"""Where the fake server (the ``server_config`` fixture) puts the preference sentences: its default."""


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(model_name=MODEL, max_model_len=4096)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(api_key=API_KEY)


def prompt_text(ids: tuple[int, ...] | None) -> str:
    return "".join(chr(i) for i in ids or ())


def test_http_runner_decodes_each_method_with_its_contexts(server: LiveServer, fake: FakeEngine, tmp_path: Path) -> None:
    prefs = ("concise", "Answer like a pirate.")
    generation = GenerationConfig(method_specs(("base", "pref", "la", "amulet"), (0.0, 0.1)), prefs, max_tokens=5)
    config = EvalConfig(
        None, 2, tmp_path, generation, HttpBackend(f"{server.url}/v1", api_key=API_KEY), charts=False, progress=False
    )
    outcome = run_eval(config)
    assert outcome.generation.generated == 2 * 2 * 5

    expected = Counter()
    for q in load_questions(None, 2):
        for pref in prefs:
            # the fake server decodes with the server's default placement, which a string preference takes
            built = preference_contexts(conversation(PAPER_SYSTEM_PROMPT, q.question), [pref], placement=PLACEMENT)
            pref_ids, base_ids = fake.encode_chat(built.prefs[0]), fake.encode_chat(built.contrast)
            for spec in generation.methods:
                settings = spec.engine_settings
                contexts = {Method.BASE: (base_ids, None), Method.PREF: (pref_ids, None)}.get(
                    settings.method, (pref_ids, base_ids)
                )
                expected[(*contexts, settings)] += 1
    got = Counter((r.prompt_ids, r.contrast_prompt_ids, r.method) for r in fake.requests)
    assert got == expected
    for request in fake.requests:
        assert request.sampling.temperature == 0 and request.sampling.max_tokens == 5 and request.sampling.seed == 0
        assert PAPER_SYSTEM_PROMPT in prompt_text(request.prompt_ids)
    rows = outcome.generation.rows
    assert all(r["response"] == "".join(REPLY_PIECES[:5]) and r["completion_tokens"] == 5 for r in rows.values())
    assert {r["finish_reason"] for r in rows.values()} == {"length"}
    assert rows[(0, "concise", "amulet-p0.1")]["method_settings"]["plausibility"] == 0.1
    assert outcome.results["run"]["model"] == MODEL


def _rows() -> dict:
    answers = {"base": "Water it daily.", "amulet": "Sun, water, pinch tops.", "la": "Keep it warm and bright."}
    return {
        (i, "concise", m): {
            "index": i,
            "preference": "concise",
            "method": m,
            "question": f"Question {i}?",
            "response": f"{text} #{i}",
        }
        for i in range(2)
        for m, text in answers.items()
    }


def test_judge_sees_question_preference_and_both_answers_in_seeded_order(
    server: LiveServer, fake: FakeEngine, tmp_path: Path
) -> None:
    config = JudgeConfig(f"{server.url}/v1", api_key=API_KEY, seed=7, max_tokens=32)
    judgments = run_judge(config, _rows(), ["base", "la", "amulet"], tmp_path, progress=False)
    assert len(judgments) == len(fake.requests) == 4  # la and amulet against base, two questions
    rows = _rows()
    for j in judgments:
        assert j["judge_model"] == MODEL and j["method_b"] == "base"
        assert j["reply"] == "".join(REPLY_PIECES)  # the fake's greeting: no verdict in it
        assert j["parsed"] is False and j["winner"] is None
        first = rows[(j["index"], "concise", j["shown_first"])]["response"]
        other = j["method_a"] if j["shown_first"] == j["method_b"] else j["method_b"]
        second = rows[(j["index"], "concise", other)]["response"]
        prompt = next(
            prompt_text(r.prompt_ids)
            for r in fake.requests
            if f"Question {j['index']}?" in prompt_text(r.prompt_ids)
            and first in prompt_text(r.prompt_ids)
            and second in prompt_text(r.prompt_ids)
        )
        assert prompt.index(first) < prompt.index(second)
        assert preference_sentence("concise") in prompt and "[[A]]" in prompt
    for request in fake.requests:
        assert request.method.method is Method.BASE  # the judge decodes plainly
        assert request.sampling.temperature == 0 and request.sampling.max_tokens == 32

    fake.reset()  # a rerun asks nothing new and shows the same order
    again = run_judge(config, _rows(), ["base", "la", "amulet"], tmp_path, progress=False)
    assert fake.requests == [] and again == judgments
    assert len((tmp_path / JUDGMENTS_FILE).read_text().splitlines()) == 4


def test_cli_through_server_with_judge_reports_unparseable_verdicts(server: LiveServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AMULET_API_KEY", API_KEY)
    monkeypatch.setenv("AMULET_JUDGE_API_KEY", API_KEY)
    out = tmp_path / "run"
    argv = [
        "--base-url", f"{server.url}/v1", "--limit", "2", "--preferences", "concise", "formal",
        "--methods", "base", "amulet", "--max-tokens", "4", "--out", str(out), "--no-progress",
        "--judge-base-url", f"{server.url}/v1", "--no-charts",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    judge = results["scorers"]["judge"]
    assert judge["judgments"] == judge["unparseable"] == judge["ties"] == 4
    assert judge["win_rate_vs_base"]["concise"]["amulet"] == {"wins": 0, "ties": 2, "losses": 0, "n": 2, "win_rate": 0.5}
    report = (out / "report.md").read_text()
    assert "4 pairwise judgments, 4 ties, of which 4 were unparseable replies (counted as ties)" in report


def test_unreachable_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["--base-url", f"http://127.0.0.1:{port}/v1", "--limit", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "Cannot reach the server" in capsys.readouterr().err


def test_wrong_api_key_is_a_clear_error(server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--base-url", f"{server.url}/v1", "--api-key", "wrong", "--limit", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 2
    assert "401" in capsys.readouterr().err


def test_ctrl_c_keeps_every_finished_answer(server: LiveServer, fake: FakeEngine, tmp_path: Path) -> None:
    """A real SIGINT to a running ``amulet-eval``: it stops (exit 130) keeping exactly the finished answers, whole,
    the server aborts the answer in flight, and the rerun completes.

    The fake engine answers the first two questions and holds the third on a gate, and the signal is sent once both
    answers are on disk and the third is held, so the state it meets does not depend on how busy the machine is. The
    child restores SIGINT's default handler (tests/eval/ctrl_c.py): a test run started as a background job would
    otherwise hand it an ignored SIGINT. The 60 s bound is only a hang guard: the stop takes a fraction of a second
    (amulet_eval.interrupt), and the message checked below is printed only by the clean stop, not by its deadline.
    """
    questions = [{"index": i, "question": f"[slow] Question number {i}?"} for i in range(8)]  # the fake: 20 ms a token
    max_tokens = 20  # 0.4 s an answer: the gate, not the answers' length, sets the state the signal meets
    (tmp_path / "q.json").write_text(json.dumps(questions))
    out = tmp_path / "run"
    args = [
        "--questions", str(tmp_path / "q.json"), "--base-url", f"{server.url}/v1", "--api-key", API_KEY,
        "--preferences", "concise", "--methods", "base", "--max-tokens", str(max_tokens), "--concurrency", "1",
        "--out", str(out), "--no-progress", "--no-charts",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMULET_")}
    gate = fake.hold(after=2)
    try:
        proc = subprocess.Popen(amulet_eval_argv(args), stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_until(
                lambda: len(fake.held) == 1 and len(complete_rows(out)) == 2,
                timeout=120,
                what="two answers on disk and the third held at the gate",
            )
            [held] = fake.held
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert "interrupted; every answer finished so far is kept" in err
        wait_until(lambda: held in fake.aborted, what="the server to abort the answer the interrupted run left")
    finally:
        gate.set()
    assert len(fake.requests) == 3 and fake.finished == [r.request_id for r in fake.requests[:2]]
    kept = complete_rows(out)
    finished = [i for r in fake.requests[:2] for i in range(8) if f"Question number {i}?" in prompt_text(r.prompt_ids)]
    assert sorted(r["index"] for r in kept) == sorted(finished) and len(finished) == 2
    text = (out / "generations.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == len(kept)  # no partial line either
    assert all(r["completion_tokens"] == max_tokens for r in kept)
    assert main(args) == 0
    rows = complete_rows(out)
    assert rows[: len(kept)] == kept and len(rows) == 8
    assert len({r["index"] for r in rows}) == 8


def test_http_runner_sends_joined_preferences_negatives_and_cfg(server: LiveServer, fake: FakeEngine, tmp_path: Path) -> None:
    """The request of each column reaches the engine as the README's rules say (see expected_requests)."""
    methods = method_specs(METHODS, negatives=NEGATIVES, guidance=(1.5, NEG_PROMPT))
    generation = GenerationConfig(methods, PREFERENCES, max_tokens=3)
    assert [m.label for m in generation.methods] == list(LABELS)
    config = EvalConfig(
        None, 1, tmp_path, generation, HttpBackend(f"{server.url}/v1", api_key=API_KEY), charts=False, progress=False
    )
    outcome = run_eval(config)
    assert outcome.generation.generated == len(MEMBERS) * len(LABELS)
    got = Counter((r.prompt_ids, r.extra_prompt_ids, r.contrast_prompt_ids, r.method) for r in fake.requests)
    assert got == expected_requests(load_questions(None, 1)[0].question, fake.encode_chat, 1.5, PLACEMENT)
    assert set(outcome.results["run"]["preferences"]) == set(MEMBERS)
