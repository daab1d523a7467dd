"""Per-request sampling parameters: the domain type every caller builds, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import GrammarSpec

MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (as in vLLM): dividing log-probabilities by a vanishing
temperature overflows to -inf everywhere, and sampling would fail on the NaNs that follow."""
MAX_STOP_SEQUENCES = 16
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
"""At most this many ``logit_bias`` entries per request."""
MAX_ABS_LOGIT_BIAS = 100.0
MAX_ABS_PENALTY = 2.0
"""``presence_penalty`` and ``frequency_penalty`` lie in [-2, 2] (OpenAI's range)."""
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
"""``repetition_penalty`` lies in [0.01, 100] (1 = off). It divides positive scores and multiplies the
others in float32: a factor that underflows float32 (1e-46 is 0 there) turns a positive score (a
``logit_bias``) into +inf, and the row's distribution into NaN. Within these bounds, and with the other
bounds here (``logit_bias`` +-100, penalties +-2, temperature >= MIN_TEMPERATURE), every score stays finite:
at most (100 + 0) / 0.01 = 1e4 before the temperature, 1e9 after it."""
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds a torch generator accepts; torch reads a seed modulo 2**64."""


def _is_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _is_whole(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int)


def _normalised_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as a tuple of ``(token id, bias)`` pairs (a mapping or pairs in, validated)."""
    try:
        pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    except TypeError:
        raise InvalidParameterError("logit_bias", "'logit_bias' must map token ids to biases.") from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidParameterError("logit_bias", f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}.")
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidParameterError("logit_bias", f"'logit_bias' entries must be (token id, bias) pairs, got {pair!r}.")
        token, bias = pair
        if not _is_whole(token) or token < 0:
            raise InvalidParameterError("logit_bias", f"'logit_bias' token ids must be whole numbers >= 0, got {token!r}.")
        if not _is_number(bias) or not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
            raise InvalidParameterError("logit_bias", f"'logit_bias' values must be numbers from -100 to 100, got {bias!r}.")
        if token in seen:
            raise InvalidParameterError("logit_bias", f"'logit_bias' names token id {token} more than once.")
        seen.add(token)
        out.append((token, float(bias)))
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, validated on construction (InvalidParameterError naming the field).

    ``max_tokens`` None means as many as the context leaves room for (see
    ``GenerationRequest.max_new_tokens``). A temperature below ``MIN_TEMPERATURE`` (0 included) is greedy.

    The logits processors (``amulet_core.sampling.processors``) act on the method's log-probabilities, in
    this order: ``logit_bias`` (token id, bias in [-100, 100]) is added; while fewer than ``min_tokens``
    tokens are generated the stop token ids (EOS unless ``ignore_eos``, and ``stop_token_ids``) are
    impossible, and stop strings do not end the request; ``repetition_penalty`` (0.01 to 100, 1 = off; vLLM's rule
    over prompt and output tokens) divides positive scores and multiplies the others; ``frequency_penalty``
    times a token's count and ``presence_penalty`` for a token that occurs are subtracted (both over the
    generated tokens only, as OpenAI). Sampled rows then apply temperature, ``min_p`` (drop tokens less
    likely than ``min_p`` times the most likely one), ``top_k`` and ``top_p``. ``logit_bias`` is a tuple
    of pairs; a mapping or a list of pairs given here is stored as that tuple.

    ``grammar`` (a ``GrammarSpec``, or None) constrains the output to a grammar (structured outputs): the
    tokens it does not allow are masked out of the method's distribution before the processors, and the
    request stops once the grammar is complete. Whether it compiles is checked by the engine.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        mt = self.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise InvalidParameterError("max_tokens", f"'max_tokens' must be a whole number >= 1, got {self.max_tokens!r}.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 100:
            raise InvalidParameterError("temperature", f"'temperature' must be a number from 0 to 100, got {t!r}.")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidParameterError("top_p", f"'top_p' must be a number in (0, 1], got {p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError("top_k", f"'top_k' must be a whole number >= 0 (0 = off), got {self.top_k!r}.")
        if self.seed is not None and (not _is_whole(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise InvalidParameterError("seed", f"'seed' must be a whole number from -2**63 to 2**64-1, got {self.seed!r}.")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop", f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.")
        ids = self.stop_token_ids
        if len(ids) > MAX_STOP_TOKEN_IDS or any(not _is_whole(i) or i < 0 for i in ids):
            raise InvalidParameterError(
                "stop_token_ids", f"'stop_token_ids' takes up to {MAX_STOP_TOKEN_IDS} whole numbers >= 0, got {ids!r}."
            )
        n = self.top_logprobs
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
            raise InvalidParameterError("top_logprobs", f"'top_logprobs' must be from 0 to {MAX_TOP_LOGPROBS}, got {n!r}.")
        self._validate_processors()
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise InvalidParameterError("grammar", f"'grammar' must be a GrammarSpec, got {type(self.grammar).__name__}.")

    def _validate_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_ABS_PENALTY <= v <= MAX_ABS_PENALTY:
                raise InvalidParameterError(name, f"'{name}' must be a number from -2 to 2, got {v!r}.")
        r = self.repetition_penalty
        if not _is_number(r) or not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise InvalidParameterError(
                "repetition_penalty",
                f"'repetition_penalty' must be a number from {MIN_REPETITION_PENALTY} to {MAX_REPETITION_PENALTY:g} "
                f"(1 = off), got {r!r}.",
            )
        m = self.min_p
        if not _is_number(m) or not 0 <= m <= 1:
            raise InvalidParameterError("min_p", f"'min_p' must be a number from 0 to 1, got {m!r}.")
        mn = self.min_tokens
        if not _is_whole(mn) or mn < 0:
            raise InvalidParameterError("min_tokens", f"'min_tokens' must be a whole number >= 0, got {mn!r}.")
        if self.max_tokens is not None and mn > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"'min_tokens' ({mn}) must not be greater than 'max_tokens' ({self.max_tokens})."
            )
        object.__setattr__(self, "logit_bias", _normalised_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether a presence, frequency or repetition penalty is on."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_history(self) -> bool:
        """Whether sampling needs the row's token history (penalties, or ``min_tokens``)."""
        return self.penalized or self.min_tokens > 0

    @property
    def needs_processing(self) -> bool:
        """Whether any logits processor (penalties, ``logit_bias``, ``min_p``, ``min_tokens``) is on; the
        sampler does none of that work for a row where this is False."""
        return self.needs_history or bool(self.logit_bias) or self.min_p > 0

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of the ``index``-th of n parallel choices (0-based): these, except that a set
        ``seed`` becomes ``seed + index`` (vLLM's rule for n > 1). A sum past ``SEED_MAX`` is taken modulo
        2**64, as torch reads a seed anyway, so the result always lies in [SEED_MIN, SEED_MAX]."""
        if not _is_whole(index) or index < 0:
            raise ValueError(f"choice index must be a whole number >= 0, got {index!r}")
        if self.seed is None or index == 0:
            return self
        seed = self.seed + index
        if seed > SEED_MAX:
            seed %= 2**64
        return dataclasses.replace(self, seed=seed)
