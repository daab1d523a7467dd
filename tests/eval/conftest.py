"""Fixtures of the evaluation tests: tiny reward models saved with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_models import save_tiny_reward_model


@pytest.fixture(scope="session")
def reward_dirs(smollm_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight reward model folders: ``chat`` (with SmolLM2's chat template) and ``plain`` (without)."""
    root = tmp_path_factory.mktemp("reward")
    return {
        "chat": save_tiny_reward_model(smollm_tokenizer, root / "chat"),
        "plain": save_tiny_reward_model(smollm_tokenizer, root / "plain", chat_template=False),
    }
