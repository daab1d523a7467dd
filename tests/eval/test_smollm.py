"""amulet-eval end to end on the embedded SmolLM2-135M: 2 questions x 2 preferences x base+amulet, 24 tokens,
with a tiny reward model and the fake-engine server as judge. Checks that every reported number follows
from the answers, that a rerun skips finished rows, and that the files agree with each other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from amulet_eval.cli import main
from amulet_eval.config import RewardConfig
from amulet_eval.proxies import word_count
from amulet_eval.reward_model import RewardModel
from tests.support.fake_engine import FakeEngine
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.smollm

PREFS = ("concise", "verbose")
METHODS = ("base", "amulet")


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    """The judge: the fake engine behind the module's ``fake_server``."""
    return FakeEngine(model_name="judge", max_model_len=8192)


@pytest.fixture(scope="module")
def reward_dir(reward_dirs: dict[str, Path]) -> Path:
    return reward_dirs["chat"]


def argv(out: Path, reward_dir: Path, judge_url: str) -> list[str]:
    return [
        "--limit", "2", "--preferences", *PREFS, "--methods", *METHODS, "--max-tokens", "24",
        "--out", str(out), "--no-progress", "--reward-model", str(reward_dir), "--reward-device", "cpu",
        "--judge-base-url", f"{judge_url}/v1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, reward_dir: Path, fake_server: LiveServer) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(argv(out, reward_dir, fake_server.url)) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {"out": out, "rows": rows, "results": results, "report": (out / "report.md").read_text()}


def md_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each table under its heading: rows of cells, header row first."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_answers_cover_every_cell(run) -> None:
    keys = {(r["index"], r["preference"], r["method"]) for r in run["rows"]}
    assert keys == {(i, p, m) for i in (0, 1) for p in PREFS for m in METHODS}
    for r in run["rows"]:
        assert r["response"].strip() and 1 <= r["completion_tokens"] <= 24
        assert r["run"]["model"] == "SmolLM2-135M-Instruct" and r["run"]["max_tokens"] == 24
    assert run["results"]["run"]["generated_now"] == 8
    ended = run["results"]["ended_before_limit"]
    for pref in PREFS:
        for m in METHODS:
            stops = [r["finish_reason"] == "stop" for r in run["rows"] if (r["preference"], r["method"]) == (pref, m)]
            assert ended[pref][m] == sum(stops) / 2
    header, *body = md_tables(run["report"])["Answers that ended before the token limit"]
    assert {(cells[0], m): float(c) for cells in body for m, c in zip(header[1:], cells[1:], strict=True)} == {
        (p, m): pytest.approx(ended[p][m], abs=0.0051) for p in PREFS for m in METHODS
    }


def test_scores_and_win_rates_follow_from_the_answers(run) -> None:
    res = run["results"]
    words = {(r["index"], r["preference"], r["method"]): word_count(r["response"]) for r in run["rows"]}
    for row in res["rows"]:
        assert row["words"] == words[(row["index"], row["preference"], row["method"])]
    proxy = res["scorers"]["proxy"]
    for pref in PREFS:
        for m in METHODS:
            assert proxy["mean"][pref][m] == pytest.approx((words[(0, pref, m)] + words[(1, pref, m)]) / 2)
        # concise: fewer words wins; verbose: more words wins; equal is a tie (half)
        sign = -1 if pref == "concise" else 1
        points = sum(
            1.0 if sign * (words[(i, pref, "amulet")] - words[(i, pref, "base")]) > 0
            else 0.5 if words[(i, pref, "amulet")] == words[(i, pref, "base")] else 0.0
            for i in (0, 1)
        )  # fmt: skip
        record = proxy["win_rate_vs_base"][pref]["amulet"]
        assert record["n"] == 2 and record["win_rate"] == pytest.approx(points / 2)
        bt = proxy["bradley_terry"][pref]
        # two methods: the stronger one is the one that wins more often
        assert (bt["amulet"] > bt["base"]) == (points > 1) and (bt["amulet"] == pytest.approx(bt["base"])) == (points == 1)
        assert proxy["metrics"][pref]["higher_is_better"] == (pref == "verbose")


def test_reward_scores_are_the_models(run, reward_dir: Path) -> None:
    rm = RewardModel.load(RewardConfig(reward_dir, device="cpu"))
    row = run["rows"][0]
    got = next(
        r["reward"]
        for r in run["results"]["rows"]
        if (r["index"], r["preference"], r["method"]) == (row["index"], row["preference"], row["method"])
    )
    assert got == pytest.approx(rm.score(row["question"], row["preference"], row["response"]), rel=1e-4, abs=1e-4)
    reward = run["results"]["scorers"]["reward"]
    assert set(reward["win_rate_vs_base"]) == {*PREFS, "all"}


def test_judge_verdicts_are_reported(run) -> None:
    judge = run["results"]["scorers"]["judge"]
    assert judge["judgments"] == 4 and judge["unparseable"] == 4  # the fake judge never answers [[A]]/[[B]]
    assert all(v["amulet"]["win_rate"] == 0.5 for v in judge["win_rate_vs_base"].values())


def test_report_tables_agree_with_the_json(run) -> None:
    res, tables = run["results"], md_tables(run["report"])
    checked = 0
    for name, heading in (("proxy", "Proxy"), ("reward", "Reward model"), ("judge", "Judge")):
        section = res["scorers"][name]
        if "mean" in section:
            title = "Proxy metrics (proxies)" if name == "proxy" else section["label"]
            header, *body = tables[title]
            for cells in body:
                pref = cells[0]
                digits = 1 if section["metrics"][pref]["name"] == "words" else 2
                for m, cell in zip(header[3:], cells[3:], strict=True):
                    assert float(cell) == pytest.approx(section["mean"][pref][m], abs=0.51 * 10**-digits)
                    checked += 1
        header, *body = tables[f"{heading}: win rate against base"]
        for cells in body:
            assert int(cells[1]) == section["win_rate_vs_base"][cells[0]]["amulet"]["n"]
            assert float(cells[2]) == pytest.approx(section["win_rate_vs_base"][cells[0]]["amulet"]["win_rate"], abs=0.0051)
            checked += 1
        header, *body = tables[f"{heading}: Bradley-Terry log-strengths"]
        for cells in body:
            for m, cell in zip(header[1:], cells[1:], strict=True):
                assert float(cell) == pytest.approx(section["bradley_terry"][cells[0]][m], abs=0.0051)
                checked += 1
    assert checked >= 30
    assert "proxies, not quality judgements" in run["report"]


def test_charts_exist_and_are_linked(run) -> None:
    charts = run["results"]["charts"]
    assert {Path(c).name for c in charts} >= {
        "proxy_scores.png",
        "proxy_win_rate.png",
        "reward_win_rate.png",
        "judge_win_rate.png",
    }
    for chart in charts:
        data = (run["out"] / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({chart})" in run["report"]


def test_rerun_skips_finished_rows(run, reward_dir: Path, fake_server: LiveServer, capsys) -> None:
    before = (run["out"] / "generations.jsonl").read_bytes()
    capsys.readouterr()
    assert main(argv(run["out"], reward_dir, fake_server.url)) == 0
    assert "0 generated now, 8 reused" in capsys.readouterr().out
    assert (run["out"] / "generations.jsonl").read_bytes() == before
    again = json.loads((run["out"] / "results.json").read_text())
    assert again["scorers"] == run["results"]["scorers"]


def test_interrupted_run_resumes(run, tmp_path: Path, reward_dir: Path, fake_server: LiveServer, capsys) -> None:
    out = tmp_path / "resume"
    shutil.copytree(run["out"], out)
    kept = (out / "generations.jsonl").read_text().splitlines()[:5]
    (out / "generations.jsonl").write_text("\n".join(kept) + '\n{"index": 1, "preference": "verb')  # killed mid-line
    capsys.readouterr()
    assert main(argv(out, reward_dir, fake_server.url)) == 0
    assert "3 generated now, 5 reused" in capsys.readouterr().out
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert lines[:5] == kept
    rows = [json.loads(line) for line in lines if line.endswith("}")]
    assert len(rows) == 8 and len({(r["index"], r["preference"], r["method"]) for r in rows}) == 8
