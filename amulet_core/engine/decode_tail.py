"""A decode step's method, logits processors and choice of tokens computed with its forward pass, in the decode graph.

After a decode step's forward pass, the method (each request's closed form over its context rows, the
plausibility mask), the logits processors and the choice of the tokens are a few dozen small kernels; launched from
Python they cost the host time that the overlapped engine would rather spend preparing the next step. The decode
graph computes them too, from static per-request inputs set before the replay (:mod:`amulet_core.engine.tail_rows`):
any method and number of preference contexts (base, pref, la, amulet, CFG, a negative preference, K up to
``MAX_PREFERENCES``), ``logit_bias``, ``min_tokens``, the repetition, frequency and presence penalties, greedy or
sampled (temperature, ``min_p``, ``top_k``, ``top_p``, a seed or none), the top log-probabilities and grammar masks
(each step's made on the host by the requests' matchers, as the host path makes them, and copied in as bits; such a
step's masks follow the tokens the host accepts, as a thinking span's coefficient and grammar do, so with the step
before still in flight its forward pass is launched first and this tail alone once those tokens are read:
:meth:`~amulet_core.engine.decode_graphs.DecodeGraphs.run_tail`). The host copies back only the packed choices
(:class:`~amulet_core.sampling.sampler.DeviceSamples`: tokens, their log-probabilities, the failed flags, the top
alternatives). The penalties and ``min_tokens`` count the step's input token, on the device, where it is the pending
output of the step in flight: such requests are overlapped too.

The arithmetic is the host path's, row for row: ``min_tokens``' stop ids ruled out (``step_rows.rule_out_early_stops``
sets them to -inf in every context row, and the processor again after the method; -inf in the first preference
row alone gives the same: the anchor, the mix with any coefficient and the distribution are then -inf there, the
other rows' values never counting), :func:`~amulet_core.method.rows.method_logprobs` (the anchor of several
preferences by :func:`~amulet_core.method.mixture.mixture_logits_float32`, padded with weight-0 slots, which add
exact zeros; then :func:`~amulet_core.method.combination.fixed_shape_logprobs`, the grammar masks folded into the
plausibility pass or applied as there), the processors (the bias added once per
biased token in float32, :func:`~amulet_core.sampling.processors.penalize` over whole rows,
which leaves the tokens never seen exactly as they were) and the greedy sampler's; so a greedy step gives the
same tokens, log-probabilities and alternatives with the tail as without it, bit for bit. A sampled row divides by
its temperature and drops the tokens below ``min_p``, past ``top_k`` and past ``top_p`` as the sampler does (the
last two sort the vocabulary: only the graphs of the steps that have them do), then draws with the exponential race
(``argmax(p / E)``, ``E ~ Exp(1)``: the same distribution as a multinomial draw, in a fixed shape: from the default
generator for an unseeded request, from its seed's counter-based noise for a seeded one, as the host sampler draws
it: :mod:`amulet_core.sampling.seeded`). Request slots past the step's requests keep valid rows; their results
are never read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import StagedTensors
from amulet_core.engine.tail_processors import TailProcessors
from amulet_core.engine.tail_rows import TailRow
from amulet_core.grammar.masks import GrammarMasks, bit_penalty_table
from amulet_core.method.combination import FixedMasks, fixed_shape_logprobs
from amulet_core.method.mixture import MAX_PREFERENCES, mixture_logits_float32
from amulet_core.sampling.fixed_shape import fixed_shape_draw
from amulet_core.sampling.params import MAX_TOP_LOGPROBS
from amulet_core.sampling.sampler import DeviceSamples


@dataclass(frozen=True)
class TailVariant:
    """Which parts of the tail a step needs; a captured graph holds one variant (the others would cost device time
    for nothing: a step of plain greedy rows needs one log-softmax and an argmax, not the contrast's, the
    plausibility pass, the temperature and the draw).

    ``pairs``: some row has a contrast; ``renormalise``: those rows have the plausibility pass; ``sampled``: some row
    is drawn; ``filtering``: some drawn row has a top-k or a top-p (two vocabulary sorts); ``mixture``: the step's
    most extra preference contexts (K - 1), so many weighted passes form the anchors; ``bias``: the width of the
    ``logit_bias`` table (0: no bias), ``stops``: of ``min_tokens``' stop-id table (0: no row rules any out),
    ``history``: of the penalties' table (0: no penalty) (:mod:`amulet_core.engine.tail_processors`); ``top_n``: the
    step's most top log-probabilities; ``seeded``: some drawn row has a seed (its counter-based noise); ``grammar``:
    some row has a grammar mask."""

    pairs: bool
    renormalise: bool
    sampled: bool
    filtering: bool
    mixture: int = 0
    bias: int = 0
    top_n: int = 0
    stops: int = 0
    history: int = 0
    seeded: bool = False
    grammar: bool = False


class TailRowsError(ValueError):
    """Rows the tail cannot hold (:meth:`DecodeTail.problem`): raised before anything is set or launched."""


class DecodeTail:
    """Static inputs and outputs of the tail for up to ``max_requests`` requests over a ``[max_rows, vocab]`` logits
    buffer, with histories of up to ``max_history`` tokens for the penalties.

    Contract: :meth:`set_rows` before the launch that computes it (:meth:`compute`, captured or eager), then
    :meth:`samples` for that step's requests; the next :meth:`set_rows` may overwrite what :meth:`samples` returned
    once the step's copy to the host has been queued.
    """

    def __init__(self, max_requests: int, max_rows: int, vocab: int, device: torch.device, max_history: int = 0) -> None:
        self.max_rows = max_rows
        self.vocab = vocab
        r, k = max_requests, MAX_PREFERENCES - 1
        self.inputs = StagedTensors(
            {
                "index": ((2, r), torch.long, 0),
                "extra": ((k, r), torch.long, 0),
                "extra_weights": ((r, k), torch.float32, 0.0),
                "numbers": ((4, r), torch.float32, 1.0),
                "flags": ((6, r), torch.bool, 1),
                "seeds": ((3, r), torch.long, 0),
                "top_k": ((r,), torch.long, 0),
                "top_p": ((r,), torch.float32, 1.0),
            },
            device,
        )
        """The per-request inputs, set with one copy a step (:class:`~amulet_core.device_tensors.StagedTensors`)."""
        for numbers in self.inputs.views("numbers"):
            numbers[3].fill_(-math.inf)
        self.index = self.inputs["index"]
        """Each request's primary and contrast rows."""
        self.extra = self.inputs["extra"]
        """Each request's rows of preference contexts 2..K, padded with its primary row."""
        self.extra_weights = self.inputs["extra_weights"]
        """Their weights, padded with 0."""
        self.numbers = self.inputs["numbers"]
        """Each request's coefficient, plausibility, temperature (1 for a greedy row) and log(min_p) (-inf for none)."""
        self.flags = self.inputs["flags"]
        """Each request: renormalised (the plausibility pass), greedy, several preferences (its anchor the mixture),
        a contrast, seeded, a grammar mask."""
        self.seeds = self.inputs["seeds"]
        """Each seeded request's seed (low and high 32 bits) and draw number (:mod:`amulet_core.sampling.seeded`)."""
        self.top_k = self.inputs["top_k"]
        """Each request's top-k, 0 for none (its k-th largest score is then -inf: nothing dropped)."""
        self.top_p = self.inputs["top_p"]
        self.processors = TailProcessors(max_requests, vocab, max_history, device)
        self.masks = StagedTensors({"bits": ((max_requests, -(-vocab // 8)), torch.uint8, 255)}, device)
        """Each request's grammar mask this step: bit ``t % 8`` of byte ``t // 8`` set where token ``t`` is allowed
        (:class:`~amulet_core.grammar.masks.GrammarMasks`' bytes), copied only for a step with a grammar."""
        self.bit_penalties = bit_penalty_table(device)
        self.variant = TailVariant(False, False, False, False)
        """The parts of the tail the step :meth:`set_rows` set up needs."""
        self.tokens = torch.zeros(max_requests, dtype=torch.long, device=device)
        self.packed = torch.zeros(3, max_requests, dtype=torch.float64, device=device)
        top = min(MAX_TOP_LOGPROBS, vocab)
        self.top = torch.zeros(2, max_requests, top, dtype=torch.float64, device=device)
        """Each request's top log-probabilities and their token ids (the first ``variant.top_n`` columns)."""
        self.count = 0
        """Requests of the step :meth:`set_rows` set up."""

    def set_rows(self, rows: Sequence[TailRow], masks: GrammarMasks | None = None) -> None:
        """The step's requests, in order (slots past them keep what they held: valid rows, never read), and the grammar
        masks of some of them (``masks.rows`` number ``rows``; on the host). Raises :class:`TailRowsError` for rows
        the tail cannot hold (:meth:`problem`), having set nothing."""
        if (problem := self.problem(rows, masks)) is not None:
            raise TailRowsError(problem)
        n, host = len(rows), self.inputs.host
        renormalise = any(row.plausibility > 0 for row in rows if row.contrast is not None)
        contrasts = [r.primary if r.contrast is None else r.contrast for r in rows]
        host("index")[:, :n] = torch.tensor([[r.primary for r in rows], contrasts], dtype=torch.long)
        mixture = max(len(r.extra) for r in rows)
        if mixture:
            slots = [[*r.extra, *[r.primary] * (mixture - len(r.extra))] for r in rows]
            host("extra")[:mixture, :n] = torch.tensor(slots, dtype=torch.long).T
            weights = [[*r.weights, *[0.0] * (mixture - len(r.weights))] for r in rows]
            host("extra_weights")[:n, :mixture] = torch.tensor(weights, dtype=torch.float32)
        temperatures = [r.temperature if r.temperature > 0 else 1.0 for r in rows]
        log_min_p = [math.log(r.min_p) if r.min_p > 0 else -math.inf for r in rows]
        numbers = [[r.coefficient for r in rows], [r.plausibility for r in rows], temperatures, log_min_p]
        host("numbers")[:, :n] = torch.tensor(numbers, dtype=torch.float32)
        # a plain row has no plausibility pass (its distribution is its row's log-softmax, once)
        flags = [
            [renormalise and not r.plain for r in rows],
            [r.temperature <= 0 for r in rows],
            [bool(r.extra) for r in rows],
            [r.contrast is not None for r in rows],
            [r.temperature > 0 and r.history.seed is not None for r in rows],
            [False] * n,
        ]
        grammar = masks is not None and len(masks.rows) > 0
        if grammar and masks is not None:  # (for the type checker: grammar says it)
            for i in masks.rows:
                flags[5][i] = True
            width = min(masks.bits.shape[1], self.masks["bits"].shape[1])
            table = torch.zeros(n, self.masks["bits"].shape[1], dtype=torch.uint8)  # tokens past the masks': banned
            table[list(masks.rows), :width] = masks.bits[:, :width].cpu()
            self.masks.host("bits")[:n] = table
            self.masks.commit("bits", n)
        host("flags")[:, :n] = torch.tensor(flags, dtype=torch.bool)
        seeded = any(flags[4])
        if seeded:
            seeds = [r.history.seed or (0, 0, 0) for r in rows]
            host("seeds")[:, :n] = torch.tensor([[s[k] for s in seeds] for k in range(3)], dtype=torch.long)
        vocab = self.vocab
        top_k = [r.top_k if 0 < r.top_k < vocab else 0 for r in rows]
        host("top_k")[:n] = torch.tensor(top_k, dtype=torch.long)
        host("top_p")[:n] = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
        self.inputs.commit()
        bias, stops, history = self.processors.set(rows)
        sampled = [r.temperature > 0 for r in rows]
        filtering = any(k > 0 or r.top_p < 1.0 for k, r, drawn in zip(top_k, rows, sampled, strict=True) if drawn)
        pairs = any(r.contrast is not None for r in rows)
        top_n = max(r.top_n for r in rows)
        self.variant = TailVariant(
            pairs, pairs and renormalise, any(sampled), filtering, mixture, bias, top_n, stops, history, seeded, grammar
        )
        self.count = n

    def problem(self, rows: Sequence[TailRow], masks: GrammarMasks | None = None) -> str | None:
        """Why the tail cannot hold these rows (too many, a row outside the logits, a bias outside the vocabulary,
        more top log-probabilities than it keeps, a mask of no row ...), or None. The host path then chooses (and fails
        what it must)."""
        n = len(rows)
        if not 0 < n <= self.tokens.shape[0] or any(not 0 <= r < self.max_rows for row in rows for r in row.rows):
            return f"{n} tail rows for {self.tokens.shape[0]} slots over {self.max_rows} logits rows"
        if masks is not None and (
            any(not 0 <= i < n for i in masks.rows)
            or len(set(masks.rows)) != len(masks.rows)
            or masks.bits.dim() != 2
            or masks.bits.shape[0] != len(masks.rows)
        ):
            return f"grammar masks of rows {masks.rows} for {n} requests"
        for row in rows:
            if len(row.extra) != len(row.weights) or len(row.extra) >= MAX_PREFERENCES:
                return f"{len(row.extra)} extra preference rows with {len(row.weights)} weights"
            if not 0 <= row.top_n <= self.top.shape[2]:
                return f"{row.top_n} top log-probabilities, at most {self.top.shape[2]}"
        return self.processors.problem(rows)

    def compute(self, logits: torch.Tensor, slots: int, variant: TailVariant, inputs: torch.Tensor | None = None) -> None:
        """The first ``slots`` requests' method and choice over ``logits`` (``[max_rows, V]`` float32), into the
        static outputs, with the parts ``variant`` names (it must cover the requests :meth:`set_rows` set up); no
        host synchronisation. ``inputs``: the token ids of the logits' rows (the graph's static input; the penalties
        count a request's input token)."""
        processors = self.processors
        primary = logits.index_select(0, self.index[0, :slots])
        grammar = self._grammar(slots) if variant.grammar else None
        if variant.stops:  # min_tokens: the stop ids out of the first preference row, before the method (see below)
            processors.rule_out(primary, slots, variant.stops)
        anchor = self._anchor(logits, primary, slots, variant)
        if variant.pairs:  # a row without a contrast reads its anchor as the contrast with A = 1: lerp gives it back
            contrast = logits.index_select(0, self.index[1, :slots])
            if variant.mixture:
                contrast = torch.where(self.flags[3, :slots].unsqueeze(1), contrast, anchor)
            coefficients, betas = self.numbers[0, :slots].unsqueeze(1), self.numbers[1, :slots]
            renormalise = self.flags[0, :slots] if variant.renormalise else None
            logprobs = fixed_shape_logprobs(anchor, contrast, coefficients, betas, renormalise, grammar)
        else:
            logprobs = torch.log_softmax(anchor.float(), dim=-1)
            if grammar is not None:
                logprobs = grammar.apply(logprobs, None)
        scores = logprobs
        if variant.bias or variant.history:
            tokens_in = None if inputs is None else inputs.index_select(0, self.index[0, :slots])
            scores = processors.apply(logprobs, slots, (variant.bias, variant.history), tokens_in)
        best, tokens = scores.max(dim=-1)  # the first maximum on ties, as the sampler's
        failed = ~torch.isfinite(best)
        if variant.sampled:
            greedy = self.flags[1, :slots]
            drawn, no_mass = self._draw(scores, slots, variant)
            tokens, failed = torch.where(greedy, tokens, drawn), torch.where(greedy, failed, no_mass)
        self.tokens[:slots].copy_(tokens)
        self.packed[0, :slots].copy_(tokens)
        self.packed[1, :slots].copy_(logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1))  # before the processors
        self.packed[2, :slots].copy_(failed)
        if variant.top_n:
            values, ids = torch.topk(logprobs, variant.top_n, dim=-1)
            self.top[0, :slots, : variant.top_n].copy_(values)
            self.top[1, :slots, : variant.top_n].copy_(ids)

    def _grammar(self, slots: int) -> FixedMasks:
        """The grammar masks of the first ``slots`` requests as penalties (``GrammarMasks.penalty``'s lookup)."""
        bits = self.masks["bits"][:slots]
        expanded = self.bit_penalties.index_select(0, bits.reshape(-1).int()).view(slots, 8 * bits.shape[1])
        return FixedMasks(expanded[:, : self.vocab], self.flags[5, :slots].unsqueeze(1))

    def _anchor(self, logits: torch.Tensor, primary: torch.Tensor, slots: int, variant: TailVariant) -> torch.Tensor:
        """Each request's preference anchor: its primary row, or for several preferences their weighted mixture
        (:func:`~amulet_core.method.rows.method_logprobs`' ``_anchor``, over ``variant.mixture`` slots)."""
        if not variant.mixture:
            return primary
        others = [logits.index_select(0, self.extra[k, :slots]) for k in range(variant.mixture)]
        mixed = mixture_logits_float32(primary, others, self.extra_weights[:slots, : variant.mixture])
        mixed = torch.nan_to_num_(mixed, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        return torch.where(self.flags[2, :slots].unsqueeze(1), mixed, primary.float())

    def _draw(self, scores: torch.Tensor, slots: int, variant: TailVariant) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's draw and whether it had no mass (:func:`~amulet_core.sampling.fixed_shape.fixed_shape_draw`)."""
        temperatures, log_min_p = self.numbers[2, :slots], self.numbers[3, :slots]
        filters = (self.top_k[:slots], self.top_p[:slots]) if variant.filtering else None
        seeded = (self.seeds[:2, :slots], self.seeds[2, :slots], self.flags[4, :slots]) if variant.seeded else None
        return fixed_shape_draw(scores, temperatures, log_min_p, filters, seeded)

    def samples(self) -> DeviceSamples:
        """The choices of the step :meth:`set_rows` set up, as the sampler gives them (packed: tokens, log-probabilities,
        failed flags, then the top log-probabilities and their ids), copies of the static outputs (the next step
        overwrites those)."""
        n, top_n = self.count, self.variant.top_n
        parts = [self.packed[:, :n].reshape(-1)]
        if top_n:
            parts += [self.top[0, :n, :top_n].reshape(-1), self.top[1, :n, :top_n].reshape(-1)]
        return DeviceSamples(self.tokens[:n].clone(), torch.cat(parts), top_n)
