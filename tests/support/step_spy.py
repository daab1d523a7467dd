"""Watching the engine's forward passes: every eager pass the engine runs goes through
``ModelRunner.run_deferring`` (which leaves some contrast rows undone: ``amulet_core.engine.deferred_contrasts``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from amulet_core.engine.llm_engine import LLMEngine

OnPass = Callable[[list, list, torch.Tensor], None]
"""Called with a pass's scheduled chunks, the sequences whose logits it returns, and those logits."""


def spy_passes(engine: LLMEngine, on_pass: OnPass, whole_rows: bool = True) -> None:
    """Call ``on_pass`` for every forward pass ``engine`` runs eagerly. With ``whole_rows`` a pass that left contrast
    rows undone shows them computed whole (their output layer over every token, from the hidden states the method
    reads): a copy; otherwise ``on_pass`` gets the engine's own logits (undone rows NaN), and may change them in place."""
    run = engine.runner.run_deferring

    def spy(chunks, logits_for, deferred, pending):
        logits, contrasts = run(chunks, logits_for, deferred, pending)
        shown = logits
        if whole_rows and contrasts is not None:
            shown = logits.clone()
            every = list(range(logits.shape[-1]))
            for row in contrasts.rows:
                shown[row] = contrasts.logits_at(row, every)
        on_pass(chunks, logits_for, shown)
        return logits, contrasts

    engine.runner.run_deferring = spy  # type: ignore[method-assign]
