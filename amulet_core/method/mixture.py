"""Several weighted preference contexts and one contrast context: one closed form.

A request may decode K preference contexts P_1..P_K with weights w_i > 0 (normalised:
``v_i = w_i / sum(w)``) and one contrast context C. The preference anchor is the weighted
geometric mixture ``l0 = log_softmax(sum_i v_i * l_{P_i})``; Algorithm 1 run with this l0 and
``lb = l_C`` is the same game as with one preference, so its closed form carries over:

* amulet and la: ``log_softmax(A * sum_i v_i l_{P_i} + (1 - A) * l_C)`` (A from the game, or
  ``1 + r``, or set directly);
* pref: ``log_softmax(sum_i v_i l_{P_i})`` (a product of experts; no contrast context);
* base: ``l_C`` alone.

``log_softmax`` of a weighted sum of log-softmaxes differs from the same weighted sum of the
logits by a constant per row, which the outer log-softmax removes, so both functions here work
on the logits directly. With K = 1 (weights ``(1,)``) everything reduces to the two-context
formulas of :mod:`amulet_core.method.settings`, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from amulet_core.errors import InvalidParameterError

MAX_PREFERENCES = 8
"""At most this many preference contexts in one request (the core's limit; the server may set a smaller one)."""


def check_weights(weights: Any) -> tuple[float, ...]:
    """The validated weights as a tuple of floats.

    Contract: ``weights`` is a sequence (not a string) of at most :data:`MAX_PREFERENCES` numbers,
    each finite and greater than 0 (booleans are not numbers here); the empty sequence is allowed
    (one preference context of weight 1). Raises InvalidParameterError naming ``weights`` otherwise.
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidParameterError("weights", f"'weights' must be a list of numbers, got {weights!r}.")
    if len(weights) > MAX_PREFERENCES:
        raise InvalidParameterError(
            "weights", f"'weights' may name at most {MAX_PREFERENCES} preference contexts, got {len(weights)}."
        )
    out = []
    for w in weights:
        try:
            value = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else math.nan
        except OverflowError:  # an int beyond float64
            value = math.inf
        if not math.isfinite(value) or value <= 0:
            raise InvalidParameterError("weights", f"Every one of 'weights' must be a finite number above 0, got {w!r}.")
        out.append(value)
    return tuple(out)


def normalize_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """``v_i = w_i / sum(w)`` in float64; the empty sequence gives ``(1.0,)``.

    Contract: ``weights`` passed :func:`check_weights`. Scaled by the largest weight first, so
    weights near float64's limit do not overflow the sum; equal weights give exactly ``1 / K`` each,
    whatever their common value (so ``(1, 1)`` and ``(2, 2)`` normalise to the same floats).
    """
    if not weights:
        return (1.0,)
    top = max(weights)
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    return tuple(s / total for s in scaled)


def mixture_logits(pref_logits: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i v_i z_{P_i}`` in float64 over ``[K, ..., V]`` logits (or a sequence of K tensors).

    Contract: K equals ``len(weights)`` (or weights is empty and K is 1); the weights are normalised
    here. A token impossible (-inf) in any preference context stays impossible (-inf). The result is
    the anchor's logits: ``log_softmax`` of it is ``l0``.
    """
    stacked = torch.stack(list(pref_logits)) if not isinstance(pref_logits, torch.Tensor) else pref_logits
    v = normalize_weights(weights)
    if stacked.shape[0] != len(v):
        raise ValueError(f"{stacked.shape[0]} preference contexts but {len(v)} weights")
    z = stacked.double()
    shape = (-1,) + (1,) * (z.dim() - 1)
    mixed = (torch.tensor(v, dtype=torch.float64, device=z.device).reshape(shape) * z).sum(dim=0)
    impossible = torch.isneginf(z).any(dim=0)
    return mixed.masked_fill(impossible, float("-inf")) if bool(impossible.any()) else mixed


def mixture_logits_float32(first: torch.Tensor, others: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The anchor's logits in float32 for rows with K > 1 preference contexts: ``z_1 + sum_k v_k (z_k - z_1)``.

    ``first``: ``[R, V]`` logits of each row's first preference context; ``others[k]``: ``[R, V]``, the
    rows' (k + 2)-th contexts; ``weights``: ``[R, len(others)]`` float32, the normalised weights of those
    contexts (``v_1 = 1 - sum`` is implicit: the weights must sum to 1 with it). A row with fewer
    contexts pads with its first context and weight 0. Written as differences from the first context,
    the rounding scales with how much the contexts differ (little: they share the conversation), not
    with the logits' size. A token impossible (-inf) in any context gives NaN or -inf here: callers map
    NaN to -inf (``torch.nan_to_num``). Returns a fresh float32 tensor.
    """
    base = first.float()
    anchor = base.clone()
    for k, other in enumerate(others):
        anchor.addcmul_(other.float() - base, weights[:, k : k + 1])
    return anchor
