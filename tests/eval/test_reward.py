"""The pluggable reward model: a tiny random-weight sequence-classification model saved with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amulet_core.errors import ModelLoadError
from amulet_eval.compare import outcomes_from_scores, win_rates
from amulet_eval.config import RewardConfig
from amulet_eval.reward_model import RewardModel, reward_messages, reward_text
from amulet_eval.scoring import reward_score_set

QUESTION = "How do I keep basil alive?"


def load(path: Path) -> RewardModel:
    return RewardModel.load(RewardConfig(path, device="cpu", dtype="float32"))


def test_chat_template_scores_equal_a_direct_forward_pass(reward_dirs, smollm_tokenizer) -> None:
    from transformers import AutoModelForSequenceClassification

    rm = load(reward_dirs["chat"])
    assert rm.uses_chat_template and rm.name == "chat"
    response = "Give it sun and water."
    text = smollm_tokenizer.apply_chat_template(reward_messages(QUESTION, "concise", response), tokenize=False)
    assert "as much as possible" in text and response in text  # the preference sentence and the answer
    ids = torch.tensor([smollm_tokenizer(text, add_special_tokens=False)["input_ids"]])
    direct = AutoModelForSequenceClassification.from_pretrained(reward_dirs["chat"], dtype=torch.float32).eval()
    with torch.inference_mode():
        want = float(direct(input_ids=ids).logits[0, 0])
    assert rm.score(QUESTION, "concise", response) == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert rm.score(QUESTION, "concise", response) == rm.score(QUESTION, "concise", response)
    assert rm.score(QUESTION, "concise", response) != rm.score(QUESTION, "concise", "Water it daily, in full sun.")
    assert rm.score(QUESTION, "concise", response) != rm.score(QUESTION, "verbose", response)


def test_plain_text_when_there_is_no_chat_template(reward_dirs, smollm_tokenizer) -> None:
    rm = load(reward_dirs["plain"])
    assert not rm.uses_chat_template
    want = smollm_tokenizer(reward_text(QUESTION, "formal", "Hello."))["input_ids"]
    assert rm.input_ids(QUESTION, "formal", "Hello.") == list(want)
    assert "Preference: Your answer should be formal" in reward_text(QUESTION, "formal", "Hello.")


def test_win_rates_follow_from_reward_scores(reward_dirs) -> None:
    rm = load(reward_dirs["chat"])
    rows = {
        (i, "concise", m): {"question": f"{QUESTION} ({i})", "response": f"{m} answer number {i}"}
        for i in range(3)
        for m in ("base", "amulet")
    }
    scores = reward_score_set(rows, rm, progress=False)
    assert scores.values[(1, "concise", "amulet")] == rm.score(f"{QUESTION} (1)", "concise", "amulet answer number 1")
    rates = win_rates(
        outcomes_from_scores(scores.values, ["base", "amulet"], scores.higher_is_better), ["base", "amulet"], "base"
    )
    wins = sum(scores.values[(i, "concise", "amulet")] > scores.values[(i, "concise", "base")] for i in range(3))
    assert rates["concise"]["amulet"].wins == wins and rates["concise"]["amulet"].n == 3


def test_missing_reward_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path / "absent")
