"""A step's method application: each request's context rows of the logits to the distribution it decodes from.

A request holds K >= 1 preference rows (the first one decoded) and, for la and amulet, one contrast row
(``amulet_core.method.mixture``). Everything is batched over the step's requests: plain one-row requests
share one log-softmax; the others one weighted sum per extra preference slot (at most
``MAX_PREFERENCES - 1`` slots, each over all rows that have one), one fused ``lerp`` and one
log-softmax. When every request is a plain two-context one in the engine's alternating layout, the
logits are read in place (no copies), as before several preferences existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import host_to_device, to_device
from amulet_core.method.combination import TokenMasks, combine_contexts_float32, implausible, plausibility_mask
from amulet_core.method.mixture import mixture_logits_float32
from amulet_core.method.partial_contrast import ContrastHead, plausible_logprobs
from amulet_core.method.settings import MethodSettings


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


def method_logprobs(
    logits: torch.Tensor,
    specs: Sequence[RowSpec],
    grammar: TokenMasks | None = None,
    contrasts: ContrastHead | None = None,
) -> torch.Tensor:
    """``[len(specs), V]`` float32 log-probabilities each request decodes from.

    ``grammar`` (rows numbered as ``specs``): the rows' grammar masks, applied once, to the distribution
    the method produced (for la and amulet the combined one, for pref with several preferences the
    mixture), which is renormalised over the allowed tokens. A row with a contrast context has its
    plausibility mask count from the anchor ``l0 = log_softmax(sum_i v_i z_i)`` (the pref context for
    K = 1) and from the most likely token the grammar allows (a token is plausible when its anchor
    probability is at least ``plausibility`` times that one's), so it never rules out every allowed
    token; the grammar mask is folded into it (one renormalisation). Rows without a contrast context
    (base, pref) get no plausibility mask, whatever their K.

    ``contrasts``: the contrast rows the forward left undone (their logits there are not read): their requests'
    distributions come from their plausible tokens' contrast logits alone (:func:`_with_undone_contrasts`).
    """
    if contrasts is not None:
        left = contrasts.rows
        undone = [i for i, s in enumerate(specs) if s.contrast is not None and s.contrast in left]
        if undone:
            return _with_undone_contrasts(logits, specs, grammar, contrasts, undone)
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
    return plausibility_mask(mixed, anchor, beta_tensor, allowed), allowed is not None


def _with_undone_contrasts(
    logits: torch.Tensor,
    specs: Sequence[RowSpec],
    grammar: TokenMasks | None,
    contrasts: ContrastHead,
    undone: list[int],
) -> torch.Tensor:
    """:func:`method_logprobs` of a step where the requests ``undone`` (positions in ``specs``) have their contrast
    rows left undone: those over their plausible tokens alone (:func:`plausible_logprobs`; the plausibility mask
    from the anchor with the grammar folded in, as for the others), the others as if they were the step alone. Each
    row's operations are its own, so its bits do not depend on what else the step holds."""
    out = torch.empty(len(specs), logits.shape[-1], dtype=torch.float32, device=logits.device)
    left = set(undone)
    others = [i for i in range(len(specs)) if i not in left]
    if others:
        allowed = grammar.restrict(others) if grammar is not None else None
        out[others] = method_logprobs(logits, [specs[i] for i in others], allowed)
    chosen = [specs[i] for i in undone]
    first = logits.index_select(0, to_device([s.primary_row for s in chosen], logits.device))
    anchor = _anchor(first, logits, chosen)
    betas = to_device([s.method.plausibility for s in chosen], logits.device)
    ruled_out = implausible(anchor, betas, grammar.restrict(undone) if grammar is not None else None)
    coefficients = [1.0 if s.coefficient is None else s.coefficient for s in chosen]
    contrast_rows = [s.contrast for s in chosen if s.contrast is not None]
    out[undone] = plausible_logprobs(anchor, ruled_out, contrast_rows, coefficients, contrasts)
    return out


def _lerp_logprobs(anchor: torch.Tensor, contrast: torch.Tensor | None, specs: Sequence[RowSpec]) -> torch.Tensor:
    """``log_softmax(zc + A (anchor - zc))`` of rows that all have a contrast context, float32."""
    assert contrast is not None
    coefficients = [1.0 if s.coefficient is None else s.coefficient for s in specs]
    coef = to_device(coefficients, anchor.device, torch.float32).reshape(-1, 1)
    return combine_contexts_float32(anchor, contrast, coef)
