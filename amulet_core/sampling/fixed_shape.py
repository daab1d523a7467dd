"""The sampler's draw in a shape that does not depend on the rows' parameters: what a captured decode graph can
compute (:mod:`amulet_core.engine.decode_tail`), row for row the arithmetic of :mod:`amulet_core.sampling.sampler`."""

from __future__ import annotations

import math

import torch

from amulet_core.sampling.seeded import race_noise


def fixed_shape_draw(
    scores: torch.Tensor,
    temperatures: torch.Tensor,
    log_min_p: torch.Tensor,
    filters: tuple[torch.Tensor, torch.Tensor] | None = None,
    seeded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's draw from ``[R, V]`` float32 ``scores`` after the sampler's temperature, min_p and (``filters``)
    top-k and top-p, and whether it had no mass (NaN or nothing left, as the sampler finds it).

    ``temperatures`` and ``log_min_p``: ``[R]`` float32 (-inf: no min_p). ``filters``: ``[R]`` top-k (0: none; long)
    and top-p (1: none; float32), None when no row has either (they cost two vocabulary sorts). ``seeded``: the seeds'
    low and high halves ``[2, R]``, the draw numbers ``[R]`` and ``[R]`` bool, the rows that race with their seed's
    counter-based noise (:mod:`amulet_core.sampling.seeded`); the others race with the default generator's, as every
    row does when it is None. The draw is the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``): a multinomial
    draw's distribution."""
    scores = scores / temperatures.unsqueeze(1)
    floor = scores.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)
    scores = scores.masked_fill(scores < floor, -math.inf)
    if filters is not None:  # the sampler's top-k, with a sort instead of its topk(k_max): the same k-th values
        top_k, top_p = filters[0].unsqueeze(1), filters[1].unsqueeze(1)
        ordered = torch.sort(scores, dim=-1, descending=True).values
        kth = ordered.gather(1, (top_k - 1).clamp_min(0)).masked_fill(top_k == 0, -math.inf)
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if filters is not None:  # the sampler's top-p: keep the smallest set of the most likely tokens that reaches it
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = (cumulative - sorted_probs > top_p) & (top_p < 1.0)
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
    no_mass = ~(probs.sum(dim=-1) > 0)
    race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)  # never 0: p / 0
    if seeded is not None:
        halves, draws, rows = seeded
        race = torch.where(rows.unsqueeze(1), race_noise(halves, draws, probs.shape[-1]), race)
    return (probs / race).argmax(dim=-1), no_mass
