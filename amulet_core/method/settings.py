"""Decoding methods on next-token logits: base, pref, la (Linear Alignment) and amulet.

Every two-context method decodes from ``log_softmax(A * l0 + (1 - A) * lb)`` where
``l0 = log_softmax(z_pref)`` and ``lb = log_softmax(z_base)``:

* ``la`` (Linear Alignment, ratio r): ``z_pref + r (z_pref - z_base)``, so ``A = 1 + r``.
* ``amulet``: the T steps of the paper's FTRL game (Algorithm 1) keep every iterate of the
  form ``a * l0 + (1 - a) * lb`` plus a constant that log_softmax removes, so the whole game
  collapses to one scalar ``A`` from an O(T) recurrence (:func:`amulet_coefficient`).

:func:`amulet_iterative` keeps the paper's loop as the reference oracle for tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import torch

from amulet_core.errors import InvalidParameterError
from amulet_core.method.mixture import MAX_PREFERENCES as MAX_PREFERENCES  # re-exported: the core's limit on K
from amulet_core.method.mixture import check_weights, normalize_weights

MAX_ITERATIONS = 1000
"""Cap on Amulet's T: the recurrence is O(T) scalar work per request, so this bounds it."""

MAX_COEFFICIENT = 1e30
"""A larger A only sharpens the distribution further towards argmax(l0 - lb); clamping keeps it finite."""


class Method(StrEnum):
    """How the next token is chosen from the preference contexts and the contrast context (the conversation
    without the preference)."""

    BASE = "base"
    PREF = "pref"
    LA = "la"
    AMULET = "amulet"

    @property
    def has_contrast(self) -> bool:
        """Whether this method decodes a contrast context besides the preference one(s) (la and amulet);
        ``MethodSettings.num_contexts`` counts all the contexts of a request."""
        return self in (Method.LA, Method.AMULET)


def _finite(param: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(param, f"'{param}' must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(param, f"'{param}' must be a finite number, got {value!r}.")
    return value


class Mode(StrEnum):
    """Which defaults fill the parameters a request leaves out."""

    DEFAULT = "default"
    """The product's defaults: readable answers from small models too (see README, "Choosing the defaults")."""
    PAPER = "paper"
    """The paper's settings exactly: T=60, eta=10, alpha=2, lambda=2 (A = 5.6487), la ratio 2, no mask."""


PAPER_SETTINGS: dict[str, Any] = {"iterations": 60, "eta": 10.0, "alpha": 2.0, "lam": 2.0, "ratio": 2.0, "plausibility": 0.0}
DEFAULT_PLAUSIBILITY = 0.5
GAME_PARAMETERS = ("iterations", "eta", "alpha", "lam")
"""Algorithm 1's parameters; with la's ``ratio`` they decide A unless ``strength`` sets it directly."""


@dataclass(frozen=True)
class MethodSettings:
    """One request's decoding method and its parameters.

    The field defaults are the product's defaults (``Mode.DEFAULT``); :meth:`paper` gives the paper's.
    ``strength`` (the API's ``coefficient``) sets A directly for la and amulet, in place of ``ratio`` and
    the game's parameters. ``weights`` asks for several preference contexts (``amulet_core.method.mixture``):
    one weight each, every one finite and above 0, at most ``MAX_PREFERENCES``; empty (the default) means
    one preference context of weight 1. An invalid field raises InvalidParameterError naming it.
    """

    method: Method = Method.AMULET
    iterations: int = 60
    eta: float = 10.0
    alpha: float = 2.0
    lam: float = 2.0
    ratio: float = 2.0
    strength: float | None = None
    plausibility: float = DEFAULT_PLAUSIBILITY
    """Contrastive-decoding plausibility mask: keep only tokens whose pref probability is at
    least this fraction of the top pref probability. 0 (off) is faithful to the paper."""
    mode: Mode = Mode.DEFAULT
    """Which defaults the parameters not given came from (for the answer's echo)."""
    weights: tuple[float, ...] = ()
    """One weight per preference context (normalised to sum 1 when decoding); empty: one context of weight 1."""

    @classmethod
    def paper(cls, method: Method | str = Method.AMULET) -> MethodSettings:
        """The paper's exact settings for a method."""
        return cls(method=Method(method), mode=Mode.PAPER, **PAPER_SETTINGS)

    @classmethod
    def from_fields(cls, given: Mapping[str, Any], mode: Mode | str = Mode.DEFAULT) -> MethodSettings:
        """Settings from the fields a request gave (names as in this class); the mode's defaults fill the rest.

        ``strength`` cannot be combined with ``ratio`` or the game's parameters: one request sets A one way.
        """
        try:
            mode = Mode(mode)
        except ValueError:
            choices = ", ".join(m.value for m in Mode)
            raise InvalidParameterError("mode", f"'mode' must be one of {choices}, got {mode!r}.") from None
        if given.get("strength") is not None:
            clash = [name for name in (*GAME_PARAMETERS, "ratio") if given.get(name) is not None]
            if clash:
                names = ", ".join(f"'{api_name(n)}'" for n in clash)
                raise InvalidParameterError(
                    "coefficient", f"'coefficient' sets A directly; it cannot be combined with {names}. Give one or the other."
                )
        fields = dict(PAPER_SETTINGS) if mode is Mode.PAPER else {}
        fields.update({k: v for k, v in given.items() if v is not None})
        return cls(mode=mode, **fields)

    def __post_init__(self) -> None:
        try:
            method = Method(self.method)
        except ValueError:
            choices = ", ".join(m.value for m in Method)
            raise InvalidParameterError("method", f"'method' must be one of {choices}, got {self.method!r}.") from None
        object.__setattr__(self, "method", method)
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it <= MAX_ITERATIONS:
            raise InvalidParameterError(
                "iterations", f"'iterations' must be a whole number from 0 to {MAX_ITERATIONS}, got {it!r}."
            )
        for field_name in ("eta", "lam"):
            name = api_name(field_name)
            if _finite(name, getattr(self, field_name)) <= 0:
                raise InvalidParameterError(name, f"'{name}' must be greater than 0, got {getattr(self, field_name)!r}.")
        for name in ("alpha", "ratio"):
            if _finite(name, getattr(self, name)) < 0:
                raise InvalidParameterError(name, f"'{name}' must be at least 0, got {getattr(self, name)!r}.")
        if self.ratio > MAX_COEFFICIENT:
            # la decodes from (1 + ratio) * l_pref - ratio * l_base; a larger ratio overflows to NaN.
            raise InvalidParameterError("ratio", f"'ratio' must be at most {MAX_COEFFICIENT:g}, got {self.ratio!r}.")
        if self.strength is not None:
            a = _finite("coefficient", self.strength)
            if not 0 <= a <= MAX_COEFFICIENT:
                raise InvalidParameterError(
                    "coefficient", f"'coefficient' must be from 0 to {MAX_COEFFICIENT:g}, got {self.strength!r}."
                )
        object.__setattr__(self, "mode", Mode(self.mode))
        beta = _finite("plausibility", self.plausibility)
        if not 0.0 <= beta < 1.0:
            raise InvalidParameterError("plausibility", f"'plausibility' must be in [0, 1), got {beta!r}.")
        object.__setattr__(self, "weights", check_weights(self.weights))

    @property
    def num_preferences(self) -> int:
        """K, the preference contexts a request decodes: ``len(weights)``, or 1 when no weights are given."""
        return len(self.weights) or 1

    @property
    def normalized_weights(self) -> tuple[float, ...]:
        """``v_i = w_i / sum(w)`` per preference context (float64); ``(1.0,)`` when no weights are given."""
        return normalize_weights(self.weights)

    @property
    def num_contexts(self) -> int:
        """Contexts one request decodes: K + 1 for la and amulet (the contrast context last), K for pref, 1 for base."""
        if self.method is Method.BASE:
            return 1
        return self.num_preferences + (1 if self.method.has_contrast else 0)

    @property
    def effective_strength(self) -> float | None:
        """The A the closed form ``A * l0 + (1 - A) * lc`` decodes with: ``strength`` when set, else la's
        ``1 + ratio`` or amulet's game; None for methods without a contrast context."""
        if self.method.has_contrast and self.strength is not None:
            return float(self.strength)
        if self.method is Method.LA:
            return min(1.0 + float(self.ratio), MAX_COEFFICIENT)
        if self.method is Method.AMULET:
            return amulet_coefficient(self.iterations, self.eta, self.alpha, self.lam)
        return None


API_NAMES: Mapping[str, str] = MappingProxyType({"lam": "lambda", "strength": "coefficient"})
"""The one rename map between MethodSettings' field names and the API's, where they differ."""


def api_name(field: str) -> str:
    """The API's name of a MethodSettings field."""
    return API_NAMES.get(field, field)


def amulet_coefficient(iterations: int, eta: float, alpha: float, lam: float) -> float:
    """The scalar A such that T steps of Algorithm 1 equal ``log_softmax(A*l0 + (1-A)*lb)``.

    Iterate t has the form ``a_t * l0 + (1 - a_t) * lb`` (plus a constant); S accumulates
    ``alpha * a_t`` for the l0 part, and each step's closed-form solution gives
    ``a_t = (lam + s_t / t + a_{t-1} / (eta t)) / (lam + 1 / (eta t))``. Python floats are float64.
    """
    a = 1.0
    s = 0.0
    for t in range(1, iterations + 1):
        s += alpha * a
        w = 1.0 / (eta * t)
        a = (lam + s / t + w * a) / (lam + w)
        if not math.isfinite(a) or abs(a) > MAX_COEFFICIENT:
            return math.copysign(MAX_COEFFICIENT, a) if not math.isnan(a) else MAX_COEFFICIENT
    return a


def linear_alignment(pref_logits: torch.Tensor, contrast_logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Linear Alignment by its formula: log_softmax(z_pref + r (z_pref - z_base))."""
    return torch.log_softmax(pref_logits + ratio * (pref_logits - contrast_logits), dim=-1)


def combine_contexts(pref_logits: torch.Tensor, contrast_logits: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """Batched closed form: row i is ``log_softmax(A_i * l0_i + (1 - A_i) * lb_i)``.

    Computed as ``log_softmax(zb + A (z0 - zb))`` on the logits, in float64, so a large A
    neither overflows nor loses the small differences it amplifies. (In float32, rounding is
    multiplied by A: ~1.5e-5 off the exact game at the paper's A = 5.65.) A token impossible in
    either context (-inf) stays impossible. The result has the dtype of the inputs (float32 at least).
    """
    out_dtype = torch.promote_types(pref_logits.dtype, torch.float32)
    coef = torch.tensor([float(a) for a in coefficients], dtype=torch.float64, device=pref_logits.device).reshape(-1, 1)
    # log_softmax(z) = z - const per row, and the final log_softmax drops constants, so the
    # combination can start from the logits themselves: two fewer passes over the vocabulary.
    z0 = pref_logits.double()
    zb = contrast_logits.double()
    mixed = zb + coef * (z0 - zb)
    impossible = torch.isneginf(z0) | torch.isneginf(zb)
    if bool(impossible.any()):
        mixed = mixed.masked_fill(impossible, float("-inf"))
    return torch.log_softmax(mixed, dim=-1).to(out_dtype)


def plausibility_mask(logprobs: torch.Tensor, pref_logits: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose pref probability is below beta times the top pref probability (beta 0 keeps all)."""
    l0 = torch.log_softmax(pref_logits.float(), dim=-1)
    threshold = l0.amax(dim=-1, keepdim=True) + torch.log(betas.float().clamp_min(1e-45)).reshape(-1, 1)
    keep = (l0 >= threshold) | (betas.reshape(-1, 1) <= 0)
    return torch.log_softmax(logprobs.masked_fill(~keep, float("-inf")), dim=-1)
