"""Next-token choice: apply each request's method to its context rows, then sample per request.

Method application is batched: all two-context requests of a step are combined in one
closed-form call. Sampling then runs per row with the request's own temperature, top-k,
top-p and seeded generator; greedy rows (temperature 0) share one argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amulet_core.methods import MethodSettings, combine_contexts, plausibility_mask
from amulet_core.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowSpec:
    """Where one request's context rows sit in the step's logits, and how to decode them."""

    primary_row: int
    base_row: int | None
    method: MethodSettings
    coefficient: float | None


def method_logprobs(logits: torch.Tensor, specs: Sequence[RowSpec]) -> torch.Tensor:
    """``[len(specs), V]`` float32 log-probabilities each request decodes from."""
    out = torch.empty(len(specs), logits.shape[-1], dtype=torch.float32, device=logits.device)
    single = [i for i, s in enumerate(specs) if s.base_row is None]
    double = [i for i, s in enumerate(specs) if s.base_row is not None]
    if single:
        rows = torch.tensor([specs[i].primary_row for i in single], device=logits.device)
        out[single] = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    if double:
        pref_rows = torch.tensor([specs[i].primary_row for i in double], device=logits.device)
        base_rows = torch.tensor([specs[i].base_row for i in double], device=logits.device)
        pref = logits.index_select(0, pref_rows)
        coefficients = [specs[i].coefficient for i in double]
        mixed = combine_contexts(pref, logits.index_select(0, base_rows), [1.0 if a is None else a for a in coefficients])
        betas = torch.tensor([specs[i].method.plausibility for i in double], device=logits.device)
        if bool((betas > 0).any()):
            mixed = plausibility_mask(mixed, pref, betas)
        out[double] = mixed.float()
    return out


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator for a seeded sampled request; None for greedy or unseeded ones."""
    if params.greedy or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _filtered_probs(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logprobs / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def choose_token(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one request's ``[V]`` log-probabilities."""
    if params.greedy:
        return int(logprobs.argmax())
    probs = _filtered_probs(logprobs, params)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError("the sampling distribution is not finite (temperature too small for these logits?)")
    return int(torch.multinomial(probs, 1, generator=generator).item())
