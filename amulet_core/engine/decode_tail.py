"""A decode step's method and choice of tokens computed with its forward pass, inside the decode graph.

After a decode step's forward pass, the method (each request's closed form over its context rows, the
plausibility mask) and the choice of the tokens are a few dozen small kernels; launched from Python they cost the
host time that the overlapped engine would rather spend preparing the next step. For a step whose requests all
decode one preference context (with or without a contrast: base, pref, la, amulet), greedily or sampled without a
seed, with no logits processor, no grammar and no top log-probabilities (:func:`tail_eligible`; the common case of
a loaded server and of OpenAI clients), the
decode graph computes them too, from static per-request inputs set before the replay, and the host copies back
only the packed choices (:class:`~amulet_core.sampling.sampler.DeviceSamples`: tokens, their log-probabilities, the
failed flags).

The arithmetic is :func:`~amulet_core.method.rows.method_logprobs`' (through
:func:`~amulet_core.method.rows.fixed_shape_logprobs`) and the greedy sampler's, row for row, so a greedy step gives
the same tokens and log-probabilities with the tail as without it, bit for bit. A sampled row divides by its
temperature and drops the tokens below ``min_p``, past ``top_k`` and past ``top_p`` as the sampler does (the last
two sort the vocabulary: only the graphs of the steps that have them do), then draws with the exponential race
(``argmax(p / E)``, ``E ~ Exp(1)``: the same distribution as a multinomial draw, in a fixed shape, from the default
generator as an unseeded request's draw is). Request slots past the step's requests keep valid rows; their results
are never read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import to_device
from amulet_core.method.rows import RowSpec, fixed_shape_logprobs
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.sampler import DeviceSamples


def tail_eligible(spec: RowSpec, params: SamplingParams) -> bool:
    """Whether a request's next token can be chosen by the tail: one preference context; greedy, or sampled without a
    seed (a seeded request draws from its own generator); no logits processor (``logit_bias``, penalties,
    ``min_tokens``) and no top log-probabilities. (The engine also leaves out requests that need the host between
    tokens: a grammar, a thinking span.)"""
    return (
        not spec.extra_rows
        and (params.greedy or params.seed is None)
        and not params.needs_history
        and not params.logit_bias
        and not (params.logprobs and params.top_logprobs)
    )


@dataclass(frozen=True)
class TailRow:
    """One request's rows in the step's (padded) logits, and its method's numbers."""

    primary: int
    contrast: int | None
    coefficient: float
    plausibility: float
    temperature: float = 0.0
    """0: greedy."""
    min_p: float = 0.0
    top_k: int = 0
    """0: off (as one at least the vocabulary's size)."""
    top_p: float = 1.0


@dataclass(frozen=True)
class TailVariant:
    """Which parts of the tail a step needs; a captured graph holds one variant (the others would cost device time
    for nothing: a step of plain greedy rows needs one log-softmax and an argmax, not the contrast's, the
    plausibility pass, the temperature and the draw).

    ``pairs``: some row has a contrast; ``renormalise``: those rows have the plausibility pass; ``sampled``: some row
    is drawn; ``filtering``: some drawn row has a top-k or a top-p (two vocabulary sorts)."""

    pairs: bool
    renormalise: bool
    sampled: bool
    filtering: bool


def tail_rows(specs: Sequence[RowSpec], row_of: Sequence[int], params: Sequence[SamplingParams]) -> list[TailRow]:
    """The tail's rows of ``specs``, whose row numbers index ``row_of`` (the logits' rows in the padded step), each
    sampled with ``params``."""
    return [
        TailRow(
            row_of[s.primary_row],
            None if s.contrast is None else row_of[s.contrast],
            1.0 if s.coefficient is None or s.contrast is None else s.coefficient,
            s.method.plausibility if s.contrast is not None else 0.0,
            0.0 if p.greedy else p.temperature,
            0.0 if p.greedy else p.min_p,
            0 if p.greedy else p.top_k,
            1.0 if p.greedy else p.top_p,
        )
        for s, p in zip(specs, params, strict=True)
    ]


class DecodeTail:
    """Static inputs and outputs of the tail for up to ``max_requests`` requests over a ``[max_rows, vocab]`` logits
    buffer.

    Contract: :meth:`set_rows` before the launch that computes it (:meth:`compute`, captured or eager), then
    :meth:`samples` for that step's requests; the next :meth:`set_rows` may overwrite what :meth:`samples` returned
    once the step's copy to the host has been queued.
    """

    def __init__(self, max_requests: int, max_rows: int, vocab: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab = vocab
        self.index = torch.zeros(2, max_requests, dtype=torch.long, device=device)
        """Each request's primary and contrast rows."""
        self.numbers = torch.ones(4, max_requests, dtype=torch.float32, device=device)
        """Each request's coefficient, plausibility, temperature (1 for a greedy row) and log(min_p) (-inf for none)."""
        self.numbers[3].fill_(-math.inf)
        self.flags = torch.ones(2, max_requests, dtype=torch.bool, device=device)
        """Each request: renormalised (the plausibility pass), greedy."""
        self.top_k = torch.zeros(max_requests, dtype=torch.long, device=device)
        """Each request's top-k, 0 for none (its k-th largest score is then -inf: nothing dropped)."""
        self.top_p = torch.ones(max_requests, dtype=torch.float32, device=device)
        self.variant = TailVariant(False, False, False, False)
        """The parts of the tail the step :meth:`set_rows` set up needs."""
        self.tokens = torch.zeros(max_requests, dtype=torch.long, device=device)
        self.packed = torch.zeros(3, max_requests, dtype=torch.float64, device=device)
        self.count = 0
        """Requests of the step :meth:`set_rows` set up."""

    def set_rows(self, rows: Sequence[TailRow]) -> None:
        """The step's requests, in order (slots past them keep what they held: valid rows, never read)."""
        n = len(rows)
        if not 0 < n <= self.tokens.shape[0] or any(
            not 0 <= r <= self.max_rows - 1 for row in rows for r in (row.primary, row.contrast or 0)
        ):
            raise ValueError(f"{n} tail rows for {self.tokens.shape[0]} slots over {self.max_rows} logits rows")
        renormalise = any(row.plausibility > 0 for row in rows if row.contrast is not None)
        device = self.index.device
        self.index[:, :n].copy_(
            to_device([[r.primary for r in rows], [r.primary if r.contrast is None else r.contrast for r in rows]], device)
        )
        temperatures = [r.temperature if r.temperature > 0 else 1.0 for r in rows]
        log_min_p = [math.log(r.min_p) if r.min_p > 0 else -math.inf for r in rows]
        numbers = [[r.coefficient for r in rows], [r.plausibility for r in rows], temperatures, log_min_p]
        self.numbers[:, :n].copy_(to_device(numbers, device, torch.float32))
        # a plain row has no plausibility pass (its distribution is its row's log-softmax, once)
        flags = [[renormalise and r.contrast is not None for r in rows], [r.temperature <= 0 for r in rows]]
        self.flags[:, :n].copy_(to_device(flags, device, torch.bool))
        vocab = self.vocab
        top_k = [r.top_k if 0 < r.top_k < vocab else 0 for r in rows]
        self.top_k[:n].copy_(to_device(top_k, device, torch.long))
        self.top_p[:n].copy_(to_device([r.top_p for r in rows], device, torch.float32))
        sampled = [r.temperature > 0 for r in rows]
        filtering = any(k > 0 or r.top_p < 1.0 for k, r, drawn in zip(top_k, rows, sampled, strict=True) if drawn)
        pairs = any(r.contrast is not None for r in rows)
        self.variant = TailVariant(pairs, pairs and renormalise, any(sampled), filtering)
        self.count = n

    def compute(self, logits: torch.Tensor, slots: int, variant: TailVariant) -> None:
        """The first ``slots`` requests' method and choice over ``logits`` (``[max_rows, V]`` float32), into the
        static outputs, with the parts ``variant`` names (it must cover the requests :meth:`set_rows` set up); no
        host synchronisation."""
        primary = logits.index_select(0, self.index[0, :slots])
        if variant.pairs:  # a plain row reads its own row as the contrast with A = 1: lerp gives it back exactly
            contrast = logits.index_select(0, self.index[1, :slots])
            coefficients, betas = self.numbers[0, :slots].unsqueeze(1), self.numbers[1, :slots]
            renormalise = self.flags[0, :slots] if variant.renormalise else None
            logprobs = fixed_shape_logprobs(primary, contrast, coefficients, betas, renormalise)
        else:
            logprobs = torch.log_softmax(primary.float(), dim=-1)
        best, tokens = logprobs.max(dim=-1)  # the first maximum on ties, as the sampler's
        failed = ~torch.isfinite(best)
        if variant.sampled:
            greedy = self.flags[1, :slots]
            drawn, no_mass = self._draw(logprobs, slots, variant.filtering)
            tokens, failed = torch.where(greedy, tokens, drawn), torch.where(greedy, failed, no_mass)
        self.tokens[:slots].copy_(tokens)
        self.packed[0, :slots].copy_(tokens)
        self.packed[1, :slots].copy_(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        self.packed[2, :slots].copy_(failed)

    def _draw(self, logprobs: torch.Tensor, slots: int, filtering: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's draw after the sampler's temperature, min_p (and, ``filtering``, top-k and top-p), and whether
        it had no mass (NaN or nothing left, as the sampler finds it)."""
        scores = logprobs / self.numbers[2, :slots].unsqueeze(1)
        floor = scores.amax(dim=-1, keepdim=True) + self.numbers[3, :slots].unsqueeze(1)
        scores = scores.masked_fill(scores < floor, -math.inf)
        if filtering:  # the sampler's top-k, with a sort instead of its topk(k_max): the same k-th values
            ordered = torch.sort(scores, dim=-1, descending=True).values
            k = self.top_k[:slots].unsqueeze(1)
            kth = ordered.gather(1, (k - 1).clamp_min(0)).masked_fill(k == 0, -math.inf)
            scores = scores.masked_fill(scores < kth, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        if filtering:  # the sampler's top-p: keep the smallest set of the most likely tokens that reaches it
            top_p = self.top_p[:slots].unsqueeze(1)
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop_sorted = (cumulative - sorted_probs > top_p) & (top_p < 1.0)
            probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
        no_mass = ~(probs.sum(dim=-1) > 0)
        race = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)  # never 0: p / 0
        return (probs / race).argmax(dim=-1), no_mass

    def samples(self) -> DeviceSamples:
        """The choices of the step :meth:`set_rows` set up, as the sampler gives them (packed: tokens, log-probabilities,
        failed flags), copies of the static outputs (the next step overwrites those)."""
        n = self.count
        return DeviceSamples(self.tokens[:n].clone(), self.packed[:, :n].reshape(-1).clone(), 0)
