"""Domain rules live in the domain types, so in-process callers get them too (not only HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import ContextLengthExceededError, InvalidParameterError
from amulet_core.method.settings import MAX_COEFFICIENT, Method, MethodSettings, Mode
from amulet_core.model.loading import EMBEDDED_MODEL_NAME, ModelConfig, _source, model_display_name
from amulet_core.sampling.params import MIN_TEMPERATURE, SamplingParams


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-9, MIN_TEMPERATURE / 2])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    assert SamplingParams(temperature=temperature).greedy


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.7, 1.0])
def test_a_real_temperature_samples(temperature: float) -> None:
    assert not SamplingParams(temperature=temperature).greedy


def test_ratio_beyond_the_coefficient_cap_is_refused_in_the_domain() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        MethodSettings(method=Method.LA, ratio=MAX_COEFFICIENT * 10)
    assert caught.value.param == "ratio"
    assert MethodSettings(method=Method.LA, ratio=MAX_COEFFICIENT - 1).effective_strength == MAX_COEFFICIENT


def _request(prompt: int, base: int | None, max_tokens: int | None) -> GenerationRequest:
    method = MethodSettings() if base is not None else MethodSettings(method=Method.BASE)
    return GenerationRequest(
        "r",
        tuple(range(1, prompt + 1)),
        SamplingParams(max_tokens=max_tokens),
        method,
        tuple(range(1, base + 1)) if base is not None else None,
    )


def test_max_new_tokens_defaults_to_the_room_the_longest_context_leaves() -> None:
    assert _request(100, None, None).max_new_tokens(512) == 412
    assert _request(100, 130, None).max_new_tokens(512) == 382  # the base context is the longer one here
    assert _request(100, 130, 382).max_new_tokens(512) == 382


def test_one_context_length_rule_names_the_field() -> None:
    with pytest.raises(ContextLengthExceededError) as too_long:
        _request(100, 512, 1).max_new_tokens(512)
    assert too_long.value.param == "messages" and "512 tokens" in too_long.value.message
    with pytest.raises(ContextLengthExceededError) as too_many:
        _request(100, 130, 383).max_new_tokens(512)
    assert too_many.value.param == "max_tokens" and "to 382 or less" in too_many.value.message


def test_one_model_display_name_for_loading_and_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    config = ModelConfig(model="~/my-model")
    assert model_display_name(config) == "my-model"  # the ~ is expanded, as loading does
    assert _source(config)[0] == str(folder)
    assert model_display_name(ModelConfig(model="~/weights/q4.gguf")) == "q4"
    assert model_display_name(ModelConfig(model="org/not-cached")) == "org/not-cached"
    assert model_display_name(ModelConfig()) == EMBEDDED_MODEL_NAME


def test_paper_mode_is_the_papers_settings_and_the_default_mode_masks() -> None:
    paper = MethodSettings.paper()
    assert (paper.iterations, paper.eta, paper.alpha, paper.lam, paper.plausibility) == (60, 10.0, 2.0, 2.0, 0.0)
    assert abs(paper.effective_strength - 5.6487) <= 1e-4 and paper.mode is Mode.PAPER
    assert MethodSettings.from_fields({}, "paper") == paper
    assert MethodSettings.from_fields({"method": "la"}, Mode.PAPER) == MethodSettings.paper(Method.LA)
    assert MethodSettings.from_fields({}) == MethodSettings()


def test_a_set_strength_replaces_the_game_and_the_ratio() -> None:
    assert MethodSettings.from_fields({"strength": 3.0}).effective_strength == 3.0
    assert MethodSettings.from_fields({"method": "la", "strength": 2.5}).effective_strength == 2.5
    assert MethodSettings.from_fields({"method": "pref", "strength": 2.5}).effective_strength is None


@pytest.mark.parametrize("clash", ["iterations", "eta", "alpha", "lam", "ratio"])
def test_strength_with_a_game_parameter_names_both(clash: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        MethodSettings.from_fields({"strength": 3.0, clash: 1})
    assert caught.value.param == "coefficient"
    assert {"lam": "'lambda'"}.get(clash, f"'{clash}'") in caught.value.message


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), MAX_COEFFICIENT * 2, "3"])
def test_strength_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        MethodSettings.from_fields({"strength": value})
    assert caught.value.param == "coefficient"


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        MethodSettings.from_fields({}, "fast")
    assert caught.value.param == "mode"
