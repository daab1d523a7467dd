"""The engine's expected answer for a request: the paper-style reference loop over the same contexts."""

from __future__ import annotations

from typing import Any

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.reference import reference_generate


def reference_answer(loaded: Any, request: GenerationRequest, stop: bool = True) -> list[int]:
    """Greedy tokens of ``request`` by :func:`reference_generate` (stopping at the model's EOS unless ``stop`` is False)."""
    return reference_generate(
        loaded.model,
        request.prompt_ids,
        request.contrast_prompt_ids,
        request.method,
        request.sampling.max_tokens,
        stop_ids=loaded.eos_token_ids if stop else (),
        extra_prompt_ids=request.extra_prompt_ids,
    )
