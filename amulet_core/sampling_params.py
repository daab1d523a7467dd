"""Per-request sampling parameters: the domain type every caller builds, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from amulet_core.errors import InvalidParameterError

MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (as in vLLM): dividing log-probabilities by a vanishing
temperature overflows to -inf everywhere, and sampling would fail on the NaNs that follow."""
MAX_STOP_SEQUENCES = 16


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, validated on construction.

    ``max_tokens`` None means as many as the context leaves room for (see
    ``GenerationRequest.max_new_tokens``). A temperature below ``MIN_TEMPERATURE`` (0 included) is greedy.
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidParameterError("seed", f"'seed' must be a whole number, got {self.seed!r}.")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop", f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.")
        n = self.top_logprobs
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
            raise InvalidParameterError("top_logprobs", f"'top_logprobs' must be from 0 to {MAX_TOP_LOGPROBS}, got {n!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE
