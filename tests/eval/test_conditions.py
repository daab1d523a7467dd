"""Several preferences at once, a negative preference and classifier-free guidance in amulet-eval, without a model:
parsing ``--preferences`` entries, the CLI's new options, the column labels and stored settings that keep resumed
runs honest, and the proxy rows of a joined condition through the whole pipeline (a scripted runner answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import preference_sentence
from amulet_core.method.settings import Method, MethodSettings
from amulet_eval.cli import parse_args
from amulet_eval.conditions import condition_sentence, parse_condition
from amulet_eval.config import EvalConfig, GenerationConfig, LocalBackend, method_specs, negative_suffix
from amulet_eval.generate import GENERATIONS_FILE, Generated, Job, SettingsMismatchError, run_generation
from amulet_eval.judge import judge_messages
from amulet_eval.pipeline import run_eval
from amulet_eval.questions import load_questions
from amulet_eval.reward_model import reward_text
from amulet_eval.scoring import proxy_preferences, proxy_rows

NEG_PROMPT = "Answer in as few words as possible."

# ---------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("entry", "label", "texts", "weights"),
    [
        ("concise", "concise", ("concise",), (1.0,)),
        (" Concise ", "concise", ("concise",), (1.0,)),
        ("Answer like a pirate.", "Answer like a pirate.", ("Answer like a pirate.",), (1.0,)),
        ("Concise + Formal", "concise+formal", ("concise", "formal"), (1.0, 1.0)),
        ("concise:2+formal", "concise:2+formal:1", ("concise", "formal"), (2.0, 1.0)),
        ("concise:3+formal:3+verbose:3", "concise+formal+verbose", ("concise", "formal", "verbose"), (1.0, 1.0, 1.0)),
        ("formal:0.25+concise", "formal:0.25+concise:1", ("formal", "concise"), (0.25, 1.0)),
        ("Use C++ in the examples.", "Use C++ in the examples.", ("Use C++ in the examples.",), (1.0,)),
        ("concise+pirate", "concise+pirate", ("concise+pirate",), (1.0,)),  # + joins presets only
        ("Style: formal", "Style: formal", ("Style: formal",), (1.0,)),
    ],
)
def test_entries_parse_to_canonical_conditions(entry: str, label: str, texts: tuple, weights: tuple) -> None:
    condition = parse_condition(entry)
    assert (condition.label, condition.texts, condition.weights) == (label, texts, weights)
    assert condition.joined == (len(texts) > 1)
    assert parse_condition(condition.label) == condition  # a stored label means the same condition


def test_generation_config_keeps_each_condition_once_under_its_label() -> None:
    config = GenerationConfig(method_specs(("base",)), ("Concise + Formal", "concise+formal", "formal:2+concise:1", "Verbose"))
    assert config.preferences == ("concise+formal", "formal:2+concise:1", "verbose")


def test_a_weight_that_is_not_short_still_round_trips() -> None:
    condition = parse_condition("concise:0.123456789+formal")
    assert condition.weights == (0.123456789, 1.0)
    assert parse_condition(condition.label).weights == condition.weights


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("concise+concise", "twice"),
        ("concise:0+formal", "above 0"),
        ("concise:-1+formal", "above 0"),
        ("concise:x+formal", "above 0"),
        ("concise:inf+formal", "above 0"),
        ("concise:2", "joined"),
        ("  ", "empty"),
    ],
)
def test_bad_entries_are_refused(entry: str, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        parse_condition(entry)


def test_judge_and_reward_model_read_every_member_sentence() -> None:
    both = f"{preference_sentence('concise')} {preference_sentence('formal')}"
    assert condition_sentence("concise+formal") == both
    assert condition_sentence("concise") == preference_sentence("concise")
    assert both in judge_messages("Q?", "concise+formal", "a", "b")[1]["content"]
    assert f"Preference: {both}\n" in reward_text("Q?", "concise+formal", "answer")


def test_proxy_rows_give_each_member_its_own_metric() -> None:
    assert [(n, t, m.name, m.higher_is_better) for n, t, m in proxy_rows("concise")] == [("concise", "concise", "words", False)]
    assert [(n, m.name, m.higher_is_better) for n, _, m in proxy_rows("concise+formal")] == [
        ("concise+formal [concise]", "words", False),
        ("concise+formal [formal]", "grade", True),
    ]
    assert [n for n, _, _ in proxy_rows("sycophantic+verbose")] == ["sycophantic+verbose [verbose]"]
    assert proxy_rows("Answer like a pirate.") == proxy_rows("sycophantic") == []
    assert proxy_preferences(["verbose", "concise:2+formal:1", "sycophantic"]) == [
        "verbose",
        "concise:2+formal:1 [concise]",
        "concise:2+formal:1 [formal]",
    ]


# ---------------------------------------------------------------- CLI


def test_cli_builds_joined_rows_negative_columns_and_cfg() -> None:
    gen = parse_args(
        [
            "--preferences", "verbose", "Concise+Formal", "concise+formal",
            "--methods", "base", "pref", "la", "amulet", "cfg",
            "--negative", "none", "Concise", "Be brief.",
            "--guidance-scale", "1.5", "--negative-prompt", NEG_PROMPT,
        ],
        environ={},
    ).generation  # fmt: skip
    assert gen.preferences == ("verbose", "concise+formal")
    neg = negative_suffix("Be brief.")
    assert neg.startswith("-vs-neg") and len(neg) == len("-vs-neg") + 6
    assert [m.label for m in gen.methods] == [
        "base", "pref", "la", "la-vs-concise", f"la{neg}", "amulet", "amulet-vs-concise", f"amulet{neg}", "cfg",
    ]  # fmt: skip
    specs = {m.label: m for m in gen.methods}
    assert specs["amulet"].describe() == {  # as before negatives existed: old rows stay reusable
        "kind": "amulet", "mode": "default", "coefficient": MethodSettings().effective_strength, "plausibility": 0.5,
        "iterations": 60, "eta": 10.0, "alpha": 2.0, "lam": 2.0,
    }  # fmt: skip
    assert specs["amulet-vs-concise"].describe() == {**specs["amulet"].describe(), "negative": "concise"}
    assert specs[f"la{neg}"].describe()["negative"] == "Be brief."
    assert specs["amulet-vs-concise"].engine_settings == specs["amulet"].engine_settings
    cfg = specs["cfg"]
    assert cfg.describe() == {"kind": "cfg", "guidance_scale": 1.5, "negative_prompt": NEG_PROMPT}
    assert cfg.engine_settings == MethodSettings(method=Method.LA, strength=1.5, plausibility=0.0)  # the server's cfg
    assert cfg.engine_settings.effective_strength == 1.5


def test_plausibility_and_strength_columns_multiply_by_negatives() -> None:
    argv = ["--methods", "amulet", "--plausibility", "0,0.5", "--coefficient", "3", "--negative", "verbose"]
    gen = parse_args(argv, environ={}).generation
    assert [m.label for m in gen.methods] == ["amulet-A3-p0-vs-verbose", "amulet-A3-vs-verbose"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "base", "cfg"], "needs --guidance-scale and --negative-prompt"),
        (["--methods", "cfg", "--guidance-scale", "2"], "needs --guidance-scale and --negative-prompt"),
        (["--guidance-scale", "2", "--negative-prompt", "x"], "add cfg to --methods"),
        (["--methods", "cfg", "--guidance-scale", "-1", "--negative-prompt", "x"], ">= 0"),
        (["--methods", "cfg", "--guidance-scale", "nan", "--negative-prompt", "x"], ">= 0"),
        (["--methods", "cfg", "--guidance-scale", "2", "--negative-prompt", " "], "empty"),
        (["--methods", "base", "pref", "--negative", "concise"], "la and amulet"),
        (["--methods", "base", "beam16", "--preferences", "concise+formal"], "beam16"),
        (["--preferences", "concise:2"], "joined"),
        (["--preferences", "concise+concise"], "twice"),
        (["--paper", "--negative", "concise"], "--negative"),
    ],
)
def test_cli_refuses_bad_combinations(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ={})
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_the_new_options_is_unchanged() -> None:
    gen = parse_args(["--preferences", "concise", "Answer like a pirate."], environ={}).generation
    assert gen.preferences == ("concise", "Answer like a pirate.")
    assert [m.label for m in gen.methods] == ["base", "pref", "la", "amulet"]
    assert all(m.negative is None for m in gen.methods)
    assert gen.methods == method_specs(("base", "pref", "la", "amulet"))


# ---------------------------------------------------------------- resume and the pipeline, with a scripted runner

ANSWERS = {
    "base": "Plants need water. They also need light. Give them both every day and they will grow well.",
    "amulet": "Water daily.",
    "amulet-vs-concise": "Hydration is indispensable; illumination is likewise fundamental to photosynthetic vigour.",
    "cfg": "Water and light.",
}


class ScriptedRunner:
    """Answers each column with a fixed text; records the jobs."""

    serial_kinds: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    async def resolve_model_name(self) -> str:
        return "scripted"

    async def start(self) -> None:
        pass

    async def generate(self, job: Job) -> Generated:
        self.jobs.append(job)
        return Generated(ANSWERS.get(job.method.label, "Some answer."), 5, "stop")

    async def close(self) -> None:
        pass


def generation(preferences=("verbose", "concise+formal"), negatives=(None, "concise"), scale: float = 1.5) -> GenerationConfig:
    specs = method_specs(("base", "amulet", "cfg"), negatives=negatives, guidance=(scale, NEG_PROMPT))
    return GenerationConfig(specs, tuple(preferences), max_tokens=8)


def test_new_settings_change_what_a_rerun_reuses(tmp_path: Path) -> None:
    questions = load_questions(None, 2)
    first = ScriptedRunner()
    summary = run_generation(tmp_path, questions, generation(), first, progress=False)
    assert summary.generated == 2 * 2 * 4
    assert {j.key[1] for j in first.jobs} == {"verbose", "concise+formal"}
    stored = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    cfg_row = next(r for r in stored if r["method"] == "cfg")
    assert cfg_row["method_settings"] == {"kind": "cfg", "guidance_scale": 1.5, "negative_prompt": NEG_PROMPT}

    again = ScriptedRunner()  # the same settings: everything is reused
    assert run_generation(tmp_path, questions, generation(), again, progress=False).reused == 16 and not again.jobs
    # Another negative is another column; another weighting another row: only those are generated.
    more = ScriptedRunner()
    summary = run_generation(
        tmp_path, questions, generation(("verbose", "concise:2+formal"), (None, "formal")), more, progress=False
    )
    assert summary.reused == 2 * 3  # base, amulet and cfg under verbose
    assert sorted({(j.key[1], j.key[2]) for j in more.jobs}) == [
        *[("concise:2+formal:1", m) for m in ("amulet", "amulet-vs-formal", "base", "cfg")],
        ("verbose", "amulet-vs-formal"),
    ]
    assert len(more.jobs) == 2 * 5
    # Another guidance scale keeps the label "cfg" but not its settings: refused, never mixed in.
    with pytest.raises(SettingsMismatchError, match="other settings"):
        run_generation(tmp_path, questions, generation(scale=3.0), ScriptedRunner(), progress=False)


def test_pipeline_reports_member_rows_and_the_settings_of_each_column(tmp_path: Path) -> None:
    config = EvalConfig(None, 2, tmp_path, generation(), LocalBackend(), charts=False, progress=False)
    results = run_eval(config, runner=ScriptedRunner()).results
    proxy = results["scorers"]["proxy"]
    assert list(proxy["mean"]) == ["verbose", "concise+formal [concise]", "concise+formal [formal]"]
    words = {m: float(len(t.split())) for m, t in ANSWERS.items()}
    assert proxy["mean"]["concise+formal [concise]"] == words
    assert proxy["mean"]["verbose"] == words
    grade = proxy["mean"]["concise+formal [formal]"]
    assert grade["amulet-vs-concise"] > grade["base"]  # the long-word answer reads at a higher grade
    assert proxy["metrics"]["concise+formal [concise]"]["higher_is_better"] is False
    assert proxy["metrics"]["concise+formal [formal]"]["name"] == "grade"
    # concise: amulet (2 words) beats base (17); verbose: base beats amulet.
    assert proxy["win_rate_vs_base"]["concise+formal [concise]"]["amulet"]["win_rate"] == 1.0
    assert proxy["win_rate_vs_base"]["verbose"]["amulet"]["win_rate"] == 0.0
    assert results["scorers"]["words"]["mean"]["concise+formal"] == words  # the length table keeps one row
    notes = results["run"]["notes"]
    assert any(n.startswith("`concise+formal`: one condition of 2 preference contexts (equal weights") for n in notes)
    assert any(n.startswith("`amulet-vs-concise`: the contrast context carries") for n in notes)
    assert any(n.startswith("`cfg`: classifier-free guidance, g = 1.5") and "ignores the row's preference" in n for n in notes)
    report = (tmp_path / "report.md").read_text()
    assert "| concise+formal [formal] | Flesch-Kincaid grade level | higher |" in report
    assert all(f"- {n}" in report for n in notes)
