"""The straightforward, paper-style decoding loop: the oracle the engine is tested against.

Every token it runs a full forward pass over each context separately (no KV cache), and
for amulet it plays the T-step game on the full vocabulary (Algorithm 1), on the weighted
mixture of the preference contexts when there are several. Slow by design. ``kv_cache=True``
computes each context's logits with transformers' own KV cache instead (one new token a step):
still nothing of the engine's, and many times faster on long prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from amulet_core.method.mixture import mixture_logits
from amulet_core.method.settings import Method, MethodSettings, combine_contexts, linear_alignment, plausibility_mask


@torch.inference_mode()
def _last_logits(model: torch.nn.Module, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
    """Next-token logits by a full forward pass. ``all_logits`` computes the logits of every
    position, as a plain ``model(input_ids).logits[:, -1]`` (the paper's code) does."""
    device = next(model.parameters()).device
    keep = 0 if all_logits else 1
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False, logits_to_keep=keep)
    return out.logits[0, -1].float()


Forward = Callable[[Sequence[int]], torch.Tensor]
"""Next-token logits of a context's token ids."""


class _CachedForward:
    """Next-token logits with transformers' KV cache, one cache per context list (keyed by the list object,
    which :func:`reference_generate` appends each chosen token to): each call feeds only the new tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self._states: dict[int, tuple[Any, int]] = {}

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        past, seen = self._states.get(id(ids), (None, 0))
        new = list(ids[seen:])
        if not new:
            raise ValueError("no new token since the last call for this context")
        tokens = torch.tensor([new], device=self.device)
        out = self.model(input_ids=tokens, cache=past, use_cache=True, logits_to_keep=1)
        self._states[id(ids)] = (out.cache, len(ids))
        return out.logits[0, -1].float()


def next_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    contrast_prompt_ids: Sequence[int] | None,
    settings: MethodSettings,
    closed_form: bool = False,
    all_logits: bool = False,
    extra_prompt_ids: Sequence[Sequence[int]] = (),
    forward: Forward | None = None,
) -> torch.Tensor:
    """Log-probabilities of the next token under the method, by full recompute of each context.

    ``prompt_ids`` and ``extra_prompt_ids`` are the K preference contexts (weighted by
    ``settings.weights``), ``contrast_prompt_ids`` the contrast context (la and amulet). With K > 1 the
    preference logits are mixed in float64 (``multi_context.mixture_logits``) and the method runs on
    that anchor: the iterative game (or la's formula) in float64, unless ``closed_form``. ``forward``
    computes a context's logits (default: a full forward pass, see ``all_logits``).
    """
    if forward is None:

        def forward(ids: Sequence[int]) -> torch.Tensor:
            return _last_logits(model, ids, all_logits)

    if extra_prompt_ids:
        return _several_preferences(forward, [prompt_ids, *extra_prompt_ids], contrast_prompt_ids, settings, closed_form)
    z_pref = forward(prompt_ids)
    if settings.method in (Method.BASE, Method.PREF):
        return torch.log_softmax(z_pref, dim=-1)
    if contrast_prompt_ids is None:
        raise ValueError(f"method {settings.method.value} needs the contrast context")
    z_contrast = forward(contrast_prompt_ids)
    return _two_context_mix(z_pref, z_contrast, settings, closed_form)


def _two_context_mix(anchor: torch.Tensor, contrast: torch.Tensor, settings: MethodSettings, closed_form: bool) -> torch.Tensor:
    """The method's log-probabilities from the preference anchor's and the contrast context's logits:
    the closed form (or A set directly), Linear Alignment, or the iterative game; then the plausibility mask."""
    coefficient = settings.effective_strength
    if (closed_form or settings.strength is not None) and coefficient is not None:
        mixed = combine_contexts(anchor.unsqueeze(0), contrast.unsqueeze(0), [coefficient])[0]
    elif settings.method is Method.LA:
        mixed = linear_alignment(anchor, contrast, settings.ratio)
    else:
        mixed = amulet_iterative(anchor, contrast, settings)
    if settings.plausibility > 0:
        betas = torch.tensor([settings.plausibility], device=mixed.device)
        mixed = plausibility_mask(mixed.unsqueeze(0), anchor.unsqueeze(0), betas)[0]
    return mixed


def _several_preferences(
    forward: Forward,
    prefs: Sequence[Sequence[int]],
    contrast_ids: Sequence[int] | None,
    settings: MethodSettings,
    closed_form: bool,
) -> torch.Tensor:
    """:func:`next_token_logprobs` for K > 1 preference contexts, in float64 (the returned log-probabilities too)."""
    if settings.method is Method.BASE or len(prefs) != settings.num_preferences:
        raise ValueError(f"{len(prefs)} preference contexts for {settings.num_preferences} weight(s) of {settings.method.value}")
    anchor = mixture_logits([forward(ids) for ids in prefs], settings.weights)
    if settings.method is Method.PREF:
        return torch.log_softmax(anchor, dim=-1)
    if contrast_ids is None:
        raise ValueError(f"method {settings.method.value} needs the contrast context")
    z_contrast = forward(contrast_ids).double()
    return _two_context_mix(anchor, z_contrast, settings, closed_form)


def reference_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    contrast_prompt_ids: Sequence[int] | None,
    settings: MethodSettings,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    closed_form: bool = False,
    all_logits: bool = False,
    extra_prompt_ids: Sequence[Sequence[int]] = (),
    kv_cache: bool = False,
) -> list[int]:
    """Greedy decoding, one full recompute per context per token (``kv_cache``: transformers' KV cache
    instead). Returns the new token ids.

    ``extra_prompt_ids``: preference contexts 2..K (see :func:`next_token_logprobs`); every context
    gets each chosen token appended, as the engine's sequences do.
    """
    stop = set(stop_ids)
    pref = list(prompt_ids)
    contrast = list(contrast_prompt_ids) if contrast_prompt_ids is not None else None
    extras = [list(ids) for ids in extra_prompt_ids]
    out: list[int] = []
    forward = _CachedForward(model) if kv_cache else None
    for _ in range(max_new_tokens):
        logprobs = next_token_logprobs(model, pref, contrast, settings, closed_form, all_logits, extras, forward)
        token = int(logprobs.argmax())
        out.append(token)
        if token in stop:
            break
        for context in (pref, contrast, *extras):
            if context is not None:
                context.append(token)
    return out


def amulet_iterative(pref_logits: torch.Tensor, contrast_logits: torch.Tensor, settings: MethodSettings) -> torch.Tensor:
    """The paper's Algorithm 1, step by step, on ``[..., V]`` logits: the reference oracle."""
    lb = torch.log_softmax(contrast_logits, dim=-1)
    l0 = torch.log_softmax(pref_logits, dim=-1)
    policy = l0
    utility_sum = torch.zeros_like(l0)
    for t in range(1, settings.iterations + 1):
        utility_sum = utility_sum + settings.alpha * (policy - lb)
        w = 1.0 / (settings.eta * t)
        policy = torch.log_softmax((settings.lam * l0 + utility_sum / t + w * policy) / (settings.lam + w), dim=-1)
    return policy


def combine_weighted(
    pref_logits: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    contrast_logits: torch.Tensor | None,
    coefficient: float | Sequence[float] | None,
) -> torch.Tensor:
    """The reference closed form, in float64: ``log_softmax(zc + A (sum_i v_i z_i - zc))`` per row.

    ``pref_logits``: K tensors ``[R, V]`` (or one ``[K, R, V]``); ``weights``: K positive weights (or
    empty for K = 1); ``contrast_logits``: ``[R, V]``, or None for ``pref`` (then the result is
    ``log_softmax(sum_i v_i z_i)`` and ``coefficient`` is ignored); ``coefficient``: A, one for all
    rows or one per row. A token impossible (-inf) in any context stays impossible. The result has
    the inputs' dtype (float32 at least). With K = 1 it equals ``methods.combine_contexts`` exactly.
    """
    stacked = torch.stack(list(pref_logits)) if not isinstance(pref_logits, torch.Tensor) else pref_logits
    out_dtype = torch.promote_types(stacked.dtype, torch.float32)
    anchor = mixture_logits(stacked, weights)
    if contrast_logits is None:
        return torch.log_softmax(anchor, dim=-1).to(out_dtype)
    if coefficient is None:
        raise ValueError("a contrast context needs a coefficient")
    rows = anchor.shape[0] if anchor.dim() > 1 else 1
    values = [float(coefficient)] * rows if isinstance(coefficient, (int, float)) else [float(a) for a in coefficient]
    mixed = combine_contexts(anchor.reshape(rows, -1), contrast_logits.double().reshape(rows, -1), values)
    return mixed.reshape(anchor.shape).to(out_dtype)
