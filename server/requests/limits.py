"""How much work one request may ask for, and how much request preparation the server does at once.

:class:`RequestLimits` is the server's setting (a frozen dataclass the CLI can fill); :func:`check_fanout`
refuses, before any rendering, a request that would decode more sequences than the budget: each of its
prompts, times ``n``, times the contexts its method decodes (K preferences and a contrast one).
"""

from __future__ import annotations

from dataclasses import dataclass

from amulet_core.errors import InvalidParameterError

DEFAULT_MAX_SEQUENCES = 64
"""Sequences (prompts x ``n`` x contexts) one request may decode: ``n`` = 8 of a request with four
preferences (5 contexts) is 40; 64 prompts of a text completion at ``n`` = 1."""
DEFAULT_PREPARATION_THREADS = 2
DEFAULT_PREPARATION_QUEUE = 32


@dataclass(frozen=True)
class RequestLimits:
    """Per-request and per-server bounds on the work of admitting requests.

    ``max_sequences``: the fan-out budget of one request (prompts x ``n`` x contexts), refused with a 400
    naming the field that takes it over. ``preparation_threads``: threads that render and tokenize requests
    (chat templates, tokenizers), off the event loop; ``preparation_queue``: requests that may wait for one
    of them; one more is answered 429 with Retry-After (:class:`~server.requests.preparation.PreparationPool`)."""

    max_sequences: int = DEFAULT_MAX_SEQUENCES
    preparation_threads: int = DEFAULT_PREPARATION_THREADS
    preparation_queue: int = DEFAULT_PREPARATION_QUEUE

    def __post_init__(self) -> None:
        if self.max_sequences < 1:
            raise ValueError(f"max_sequences must be at least 1, got {self.max_sequences}")
        if self.preparation_threads < 1:
            raise ValueError(f"preparation_threads must be at least 1, got {self.preparation_threads}")
        if self.preparation_queue < 0:
            raise ValueError(f"preparation_queue must be at least 0, got {self.preparation_queue}")


def check_fanout(limits: RequestLimits, *, n: int, contexts: int = 1, prompts: int = 1, source: str = "preference") -> None:
    """Refuse a request of ``prompts`` x ``n`` x ``contexts`` sequences over ``limits.max_sequences``.

    The error names the field that takes the product over the budget: ``n`` when one choice of every prompt
    fits, else ``prompt`` for several prompts (text completions) or ``source`` (the field the contexts come
    from) for one."""
    total = prompts * n * contexts
    budget = limits.max_sequences
    if total <= budget:
        return
    fits_once = prompts * contexts <= budget  # one choice of every prompt fits: n takes it over
    param = "n" if fits_once else ("prompt" if prompts > 1 else source)
    parts = [f"{prompts} prompts"] if prompts > 1 else []
    parts.append(f"n = {n}")
    if contexts > 1:
        parts.append(f"{contexts} contexts")
    raise InvalidParameterError(
        param,
        f"This request would decode {total} sequences ({' x '.join(parts)}), more than this server's limit of "
        f"{budget} per request; ask for fewer ('{param}').",
    )
