"""Reward-model scores: any Hugging Face sequence-classification reward model from a local folder.

The model reads (question + preference, answer): with a chat template, as a user turn holding the
question and the preference sentence(s) followed by an assistant turn holding the answer; without one,
as plain text (``Question: ... Preference: ... Answer: ...``). The score is the model's ``score``
output when it has one (ArmoRM, with ``--reward-trust-remote-code``), else logit 0. Nothing is
downloaded: the folder must hold the weights and the tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from amulet_core.errors import ModelLoadError
from amulet_core.model.loading import resolve_device, resolve_dtype
from amulet_eval.conditions import condition_sentence
from amulet_eval.config import RewardConfig

logger = logging.getLogger(__name__)


def reward_messages(question: str, preference: str, response: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{question}\n\n{condition_sentence(preference)}"},
        {"role": "assistant", "content": response},
    ]


def reward_text(question: str, preference: str, response: str) -> str:
    return f"Question: {question}\nPreference: {condition_sentence(preference)}\nAnswer: {response}"


class RewardModel:
    """Scores answers one at a time (no padding, so any model's pooling is right)."""

    def __init__(self, model: Any, tokenizer: Any, config: RewardConfig, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.device = next(model.parameters()).device
        self.uses_chat_template = getattr(tokenizer, "chat_template", None) is not None

    @classmethod
    def load(cls, config: RewardConfig) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = config.path.expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Reward model folder {str(path)!r} has no config.json: pass a local Hugging Face model folder "
                "(weights and tokenizer; nothing is downloaded)."
            )
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        kwargs = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load the reward model from {str(path)!r}: {exc}") from exc
        model.to(device)
        model.eval()
        logger.info("reward model %s on %s in %s", path.name, device, dtype)
        return cls(model, tokenizer, config, path.name)

    def input_ids(self, question: str, preference: str, response: str) -> list[int]:
        if self.uses_chat_template:
            text = self.tokenizer.apply_chat_template(reward_messages(question, preference, response), tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(reward_text(question, preference, response))["input_ids"]
        ids = list(ids)
        if len(ids) > self.config.max_length:
            logger.warning("reward input of %d tokens cut to the last %d", len(ids), self.config.max_length)
            ids = ids[-self.config.max_length :]
        return ids

    @torch.inference_mode()
    def score(self, question: str, preference: str, response: str) -> float:
        ids = torch.tensor([self.input_ids(question, preference, response)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        score = getattr(out, "score", None)
        value = score if score is not None else out.logits[0, 0]
        return float(torch.as_tensor(value).float().reshape(-1)[0])
