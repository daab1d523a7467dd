"""The contrast rows whose output layer a step leaves undone, on the engine's side.

A request with a contrast context and a plausibility mask (la and amulet, ``plausibility`` above 0) needs its
contrast row's logits at its plausible tokens only (:mod:`amulet_core.method.partial_contrast`). The runner then
runs the forward up to the last norm, multiplies every other row by the output layer as before, and hands the
method a :class:`DeferredContrasts`: the left rows' hidden states and the output layer, which computes a row's
logits at the tokens asked for. An 8-bit output layer (:class:`~amulet_core.model.q8_output.Q8Linear`) gives each
of them the bits the whole row would have; a dense one multiplies the chosen rows of its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amulet_core.device_tensors import to_device
from amulet_core.engine.packed_forward import LlamaFamilyForward
from amulet_core.engine.paged_attention import PackedBatch
from amulet_core.model.q8_output import Q8Linear

OutputsAt = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""One hidden row's logits at some tokens, float32."""


def outputs_at(head: object) -> OutputsAt | None:
    """How ``head`` computes some of a row's logits, or None for an output layer it cannot (anything but an 8-bit one
    or a plain ``nn.Linear``: the row is then computed whole)."""
    if isinstance(head, Q8Linear):
        return head.outputs_at
    if type(head) is nn.Linear:
        return lambda x, tokens: _dense_outputs(head, x, tokens)
    return None


def _dense_outputs(head: nn.Linear, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    index = to_device(tokens, head.weight.device, torch.long)
    bias = None if head.bias is None else head.bias.index_select(0, index)
    return F.linear(x.to(head.weight.dtype), head.weight.index_select(0, index), bias).to(torch.float32)


@dataclass(frozen=True)
class DeferredContrasts:
    """Rows of a step's logits left undone (:class:`~amulet_core.method.partial_contrast.ContrastHead`): each one's
    hidden state after the last norm, and how the output layer computes some of a row's logits."""

    hidden: dict[int, torch.Tensor]
    outputs_at: OutputsAt

    @property
    def rows(self) -> frozenset[int]:
        return frozenset(self.hidden)

    def logits_at(self, row: int, tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.outputs_at(self.hidden[row], tokens)

    def select(self, rows: Sequence[int]) -> DeferredContrasts | None:
        """The rows of ``rows`` (renumbered by their positions in it) that are left undone; None if none is."""
        kept = {new: self.hidden[old] for new, old in enumerate(rows) if old in self.hidden}
        return DeferredContrasts(kept, self.outputs_at) if kept else None


def forward_deferring(
    forward: LlamaFamilyForward,
    outputs: OutputsAt,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | int, PackedBatch],
    rows: int,
    deferred: Sequence[int],
) -> tuple[torch.Tensor, DeferredContrasts]:
    """Float32 logits ``[rows, V]`` of a step (``inputs``: its ids, positions, kept positions and batch, as
    :meth:`LlamaFamilyForward.__call__` takes them) with the rows ``deferred`` left undone (NaN), and those rows."""
    ids, positions, keep, batch = inputs
    hidden = forward.hidden(ids.unsqueeze(0), positions.unsqueeze(0), keep, batch)[0]
    skipped = set(deferred)
    left, done = sorted(skipped), [i for i in range(rows) if i not in skipped]
    logits = torch.empty(rows, forward.head.out_features, dtype=torch.float32, device=hidden.device)
    logits[left] = float("nan")
    if done:
        index = to_device(done, hidden.device, torch.long)
        logits.index_copy_(0, index, forward.head(hidden.index_select(0, index)).to(torch.float32))
    return logits, DeferredContrasts({i: hidden[i] for i in left}, outputs)
