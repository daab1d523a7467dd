"""The reference loop with transformers' KV cache decodes exactly what its full-recompute loop does."""

from __future__ import annotations

import random

import pytest

from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize(
    "settings",
    [
        MethodSettings(method=Method.BASE),
        MethodSettings(method=Method.PREF),
        MethodSettings(method=Method.LA),
        MethodSettings.paper(),
        MethodSettings(),
        MethodSettings(weights=(2.0, 1.0)),
    ],
    ids=["base", "pref", "la", "amulet-paper", "amulet", "amulet-two-preferences"],
)
def test_the_kv_cache_changes_nothing(tiny_model, family: str, settings: MethodSettings) -> None:
    loaded = tiny_model(family)
    rng = random.Random(7)
    head = [rng.randrange(10, 5000) for _ in range(20)]
    pref = head + [rng.randrange(10, 5000) for _ in range(9)]
    base = head + [rng.randrange(10, 5000) for _ in range(4)]
    extras = [head + [rng.randrange(10, 5000) for _ in range(6)]] if settings.num_preferences == 2 else []
    second = None if settings.method in (Method.BASE, Method.PREF) else base
    kwargs = {"stop_ids": loaded.eos_token_ids, "extra_prompt_ids": extras}
    full = reference_generate(loaded.model, pref, second, settings, 24, **kwargs)
    cached = reference_generate(loaded.model, pref, second, settings, 24, kv_cache=True, **kwargs)
    assert cached == full and len(full) >= 1
