"""A step's method application: each request's context rows of the logits to the distribution it decodes from.

A request holds K >= 1 preference rows (the first one decoded) and, for la and amulet, one contrast row
(``amulet_core.method.mixture``). Everything is batched over the step's requests: plain one-row requests
share one log-softmax; the others one weighted sum per extra preference slot (at most
``MAX_PREFERENCES - 1`` slots, each over all rows that have one), one fused ``lerp`` and one
log-softmax. When every request is a plain two-context one in the engine's alternating layout, the
logits are read in place (no copies), as before several preferences existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from amulet_core.device_tensors import host_to_device, to_device
from amulet_core.method.mixture import mixture_logits_float32
from amulet_core.method.settings import MethodSettings


class TokenMasks(Protocol):
    """Per-row masks of the tokens some rows may not take next (``grammar.masks.TokenMasks``): the method
    applies them to the distribution it produced, and knows nothing of the grammars behind them."""

    @property
    def index(self) -> torch.Tensor:
        """The masked rows' numbers, a long tensor on the logits' device."""
        ...

    def add_to_(self, scores: torch.Tensor, renormalise: bool = False) -> None:
        """Add 0 (allowed) or -inf (banned) to the masked rows of ``scores``, in place."""
        ...

    def apply_(self, logprobs: torch.Tensor) -> None:
        """Mask the rows in place and renormalise each one."""
        ...

    def restrict(self, rows: Sequence[int]) -> TokenMasks | None:
        """The masks of those of ``rows`` that have one, numbered by their positions in ``rows``."""
        ...

    def without(self, rows: Iterable[int]) -> TokenMasks:
        """These masks less those of ``rows``."""
        ...


@dataclass(frozen=True)
class RowSpec:
    """Where one request's context rows sit in the step's logits, and how to decode them.

    ``primary_row``: the first preference context's row, the decoded one (for base, the conversation as
    given). ``contrast``: the contrast context's row, present exactly for la and amulet. ``extra_rows``:
    the rows of preference contexts 2..K (empty for K = 1). ``weights``: the normalised weights of all K
    preference contexts in order (``MethodSettings.normalized_weights``), given exactly when
    ``extra_rows`` is. ``coefficient``: A of the closed form (None for base and pref).
    """

    primary_row: int
    contrast: int | None
    method: MethodSettings
    coefficient: float | None
    extra_rows: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.extra_rows and len(self.weights) != 1 + len(self.extra_rows):
            raise ValueError(f"{1 + len(self.extra_rows)} preference rows but {len(self.weights)} weights")

    @classmethod
    def of(
        cls,
        pref_rows: Sequence[int],
        weights: Sequence[float],
        contrast: int | None,
        method: MethodSettings,
        coefficient: float | None,
    ) -> RowSpec:
        """The spec of K = ``len(pref_rows)`` preference rows (``weights``: normalised, one per row; ignored for K = 1)."""
        first, *extra = pref_rows
        return cls(first, contrast, method, coefficient, tuple(extra), tuple(weights) if extra else ())

    @property
    def pref_rows(self) -> tuple[int, ...]:
        """The rows of the K preference contexts, the decoded one first."""
        return (self.primary_row, *self.extra_rows)

    @property
    def plain(self) -> bool:
        """One row only (base, or pref with one preference): the row's own log-softmax."""
        return self.contrast is None and not self.extra_rows


def combine_contexts_float32(
    pref_logits: torch.Tensor, contrast_logits: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """``log_softmax(zb + A (z0 - zb))`` per row in float32: one fused ``lerp``, one fix-up, one log_softmax.

    ``coefficients`` is ``[R, 1]`` float32. Where a token is impossible (-inf) in either context the mix
    is -inf or NaN (or +inf for a negative A); all of those become -inf, as in ``combine_contexts``.
    """
    mixed = torch.lerp(contrast_logits.float(), pref_logits.float(), coefficients)
    mixed = torch.nan_to_num_(mixed, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    return torch.log_softmax(mixed, dim=-1)


def method_logprobs(logits: torch.Tensor, specs: Sequence[RowSpec], grammar: TokenMasks | None = None) -> torch.Tensor:
    """``[len(specs), V]`` float32 log-probabilities each request decodes from.

    ``grammar`` (rows numbered as ``specs``): the rows' grammar masks, applied once, to the distribution
    the method produced (for la and amulet the combined one, for pref with several preferences the
    mixture), which is renormalised over the allowed tokens. A row with a contrast context has its
    plausibility mask count from the anchor ``l0 = log_softmax(sum_i v_i z_i)`` (the pref context for
    K = 1) and from the most likely token the grammar allows (a token is plausible when its anchor
    probability is at least ``plausibility`` times that one's), so it never rules out every allowed
    token; the grammar mask is folded into it (one renormalisation). Rows without a contrast context
    (base, pref) get no plausibility mask, whatever their K.
    """
    device = logits.device
    if all(s.contrast is not None and not s.extra_rows for s in specs) and all(
        s.primary_row == 2 * i and s.contrast == 2 * i + 1 for i, s in enumerate(specs)
    ):
        # The engine's layout when every request has two contexts: pref and contrast rows alternate (no copies).
        pairs = logits.view(len(specs), 2, logits.shape[-1])
        mixed, masked = _combined_logprobs(pairs[:, 0], pairs[:, 1], None, specs, grammar)
        if grammar is not None and not masked:
            grammar.apply_(mixed)
        return mixed
    plain = [i for i, s in enumerate(specs) if s.plain]
    mixture = [i for i, s in enumerate(specs) if not s.plain]
    out = torch.empty(len(specs), logits.shape[-1], dtype=torch.float32, device=device)
    masked = False
    if plain:
        rows = to_device([specs[i].primary_row for i in plain], device)
        out[plain] = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    if mixture:
        chosen = [specs[i] for i in mixture]
        first = logits.index_select(0, to_device([s.primary_row for s in chosen], device))
        allowed = grammar.restrict(mixture) if grammar is not None else None
        out[mixture], masked = _combined_logprobs(first, None, logits, chosen, allowed)
    if grammar is not None:
        grammar.without(mixture if masked else ()).apply_(out)
    return out


def fixed_shape_logprobs(
    anchor: torch.Tensor,
    contrast: torch.Tensor,
    coefficients: torch.Tensor,
    betas: torch.Tensor,
    renormalise: torch.Tensor | None,
    grammar: FixedMasks | None = None,
) -> torch.Tensor:
    """:func:`method_logprobs` of the rows of a step, in a shape that does not depend on which rows are plain: what a
    captured decode graph can compute (no host decision, no indexing by a host list).

    ``anchor``: ``[R, V]`` each row's preference anchor (its preference context's logits for K = 1, the float32
    weighted mixture of :func:`~amulet_core.method.mixture.mixture_logits_float32` for K > 1, as :func:`method_logprobs`
    forms it); ``contrast``: ``[R, V]`` its contrast context's logits. A row without a contrast gives its anchor as
    ``contrast`` with a coefficient of 1, which ``lerp`` returns exactly, so it gets its anchor's log-softmax.
    ``coefficients`` ``[R, 1]`` float32 (A); ``betas`` ``[R]`` float32 (the plausibility; 0 for a row without a
    contrast); ``renormalise`` ``[R]`` bool: the rows with the plausibility pass, which :func:`method_logprobs` gives
    every row that is not plain (a contrast, or K > 1) in a step as soon as one row with a contrast has a plausibility
    above 0; None: no row has it (and it is not computed). ``grammar``: the rows' grammar masks, folded into the
    plausibility pass of the rows that have it and applied (added, renormalised) to the others, as
    :func:`method_logprobs` does. Row by row the same operations as :func:`method_logprobs`, so the same bits.
    """
    mixed = combine_contexts_float32(anchor, contrast, coefficients)
    if renormalise is None:
        return mixed if grammar is None else grammar.apply(mixed, None)
    masked = _plausibility_mask(mixed.clone(), anchor, betas, grammar)
    out = torch.where(renormalise.unsqueeze(1), masked, mixed)
    return out if grammar is None else grammar.apply(out, renormalise)


@dataclass(frozen=True)
class FixedMasks:
    """Grammar masks of every row of a step in a fixed shape (a decode graph's): ``penalty`` ``[R, V]`` float32, 0 where
    a row's token is allowed and -inf where it is banned, and ``masked`` ``[R, 1]`` bool, the rows that have a mask (the
    others' penalties are never read)."""

    penalty: torch.Tensor
    masked: torch.Tensor

    def add_to_(self, scores: torch.Tensor) -> None:
        """The penalties added to the masked rows of ``scores``, in place (the others unchanged)."""
        scores.copy_(torch.where(self.masked, scores + self.penalty, scores))

    def clamp(self, threshold: torch.Tensor) -> torch.Tensor:
        """The plausibility thresholds of the masked rows at least the lowest float (their banned tokens always go)."""
        return torch.where(self.masked, threshold.clamp_min(torch.finfo(torch.float32).min), threshold)

    def apply(self, logprobs: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """The masked rows (less ``skip``'s, ``[R]`` bool: their masks are in their plausibility pass) with their
        penalties added and renormalised (``GrammarMasks.apply_``'s arithmetic); the other rows as they are."""
        rows = self.masked if skip is None else self.masked & ~skip.unsqueeze(1)
        return torch.where(rows, torch.log_softmax(logprobs + self.penalty, dim=-1), logprobs)


def _anchor(first: torch.Tensor, logits: torch.Tensor, specs: Sequence[RowSpec]) -> torch.Tensor:
    """The anchor's logits of every spec (``first``: their first preference rows): ``first`` itself where
    K = 1 (no copy), the float32 weighted mixture where K > 1."""
    several = [j for j, s in enumerate(specs) if s.extra_rows]
    if not several:
        return first
    device = logits.device
    anchor = first.to(torch.float32, copy=True)
    slots = max(len(specs[j].extra_rows) for j in several)
    # A padded [rows, slots] layout: a row with fewer contexts repeats its first one with weight 0.
    index = [[*specs[j].extra_rows, *[specs[j].primary_row] * (slots - len(specs[j].extra_rows))] for j in several]
    weights = [[*specs[j].weights[1:], *[0.0] * (slots - len(specs[j].extra_rows))] for j in several]
    where = to_device(several, device, torch.long)
    index_t = to_device(index, device, torch.long)
    weights_t = host_to_device(torch.tensor(weights, dtype=torch.float64).to(torch.float32), device)
    head = anchor.index_select(0, where)
    others = [logits.index_select(0, index_t[:, k]) for k in range(slots)]
    mixed = mixture_logits_float32(head, others, weights_t)
    mixed = torch.nan_to_num_(mixed, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    return anchor.index_copy_(0, where, mixed)


def _combined_logprobs(
    first: torch.Tensor,
    contrast: torch.Tensor | None,
    logits: torch.Tensor | None,
    specs: Sequence[RowSpec],
    allowed: TokenMasks | None = None,
) -> tuple[torch.Tensor, bool]:
    """The rows of non-plain specs, and whether ``allowed``'s masks are applied (folded into the plausibility mask).

    ``first``: the specs' first preference rows. ``contrast``: their contrast rows, when the caller has them
    already (every spec has one); else they are read from ``logits`` by the specs' row numbers.
    """
    anchor = _anchor(first, logits, specs) if logits is not None else first
    with_contrast = [j for j, s in enumerate(specs) if s.contrast is not None]
    if contrast is None and with_contrast:
        assert logits is not None
        rows = to_device([specs[j].contrast for j in with_contrast], first.device)
        contrast = logits.index_select(0, rows)
    if len(with_contrast) == len(specs):
        mixed = _lerp_logprobs(anchor, contrast, specs)
    else:  # some pref rows with several preferences: the anchor alone
        mixed = torch.log_softmax(anchor.float(), dim=-1)
        if with_contrast:
            where = to_device(with_contrast, first.device, torch.long)
            picked = [specs[j] for j in with_contrast]
            mixed.index_copy_(0, where, _lerp_logprobs(anchor.index_select(0, where), contrast, picked))
    betas = [s.method.plausibility if s.contrast is not None else 0.0 for s in specs]
    if not any(b > 0 for b in betas):
        return mixed, False
    beta_tensor = to_device(betas, first.device)
    return _plausibility_mask(mixed, anchor, beta_tensor, allowed), allowed is not None


def _lerp_logprobs(anchor: torch.Tensor, contrast: torch.Tensor | None, specs: Sequence[RowSpec]) -> torch.Tensor:
    """``log_softmax(zc + A (anchor - zc))`` of rows that all have a contrast context, float32."""
    assert contrast is not None
    coefficients = [1.0 if s.coefficient is None else s.coefficient for s in specs]
    coef = to_device(coefficients, anchor.device, torch.float32).reshape(-1, 1)
    return combine_contexts_float32(anchor, contrast, coef)


def _plausibility_mask(
    logprobs: torch.Tensor, pref_logits: torch.Tensor, betas: torch.Tensor, allowed: TokenMasks | FixedMasks | None = None
) -> torch.Tensor:
    """``methods.plausibility_mask`` with the same threshold arithmetic, fewer passes: the rows with beta 0
    get a threshold of -inf instead of a separate mask, and the float32 ``logprobs`` are masked in place.

    The rows of ``allowed`` also lose their banned tokens, in the same pass: their pref log-probabilities
    are -inf there, so the threshold counts from the most likely allowed token, and a threshold at least
    the lowest float (not -inf, even for beta 0) drops exactly the banned tokens plus the implausible ones.
    """
    l0 = torch.log_softmax(pref_logits.float(), dim=-1)
    if allowed is not None:
        allowed.add_to_(l0)
    threshold = l0.amax(dim=-1, keepdim=True) + torch.log(betas.float().clamp_min(1e-45)).reshape(-1, 1)
    threshold = threshold.masked_fill(betas.reshape(-1, 1) <= 0, float("-inf"))
    if isinstance(allowed, FixedMasks):
        threshold = allowed.clamp(threshold)
    elif allowed is not None:
        lowest = torch.finfo(torch.float32).min
        threshold.index_copy_(0, allowed.index, threshold.index_select(0, allowed.index).clamp_min(lowest))
    return torch.log_softmax(logprobs.masked_fill_(l0 < threshold, float("-inf")), dim=-1)
