"""What the decode graph's tail reads of a step's requests (:mod:`amulet_core.engine.decode_tail`): each request's
rows of the padded logits and the numbers of its method and sampling (:class:`TailRow`), built on the host from
the method's row specs, the sampling parameters and, for the processors that read the tokens generated so far
(penalties, ``min_tokens``), the request's history (:class:`TailHistory`).

With the host overlapped, the token chosen by the step still in flight is not on the host when the next step is
set up: it is the next step's input token, on the device. A :class:`TailHistory` therefore says whether the step's
input token is such a pending output token (the tail counts it from the graph's token ids) beside the output ids
the host has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amulet_core.method.rows import RowSpec
from amulet_core.sampling.params import SamplingParams


@dataclass(frozen=True)
class TailHistory:
    """What the tail's processors read of a request's tokens.

    ``output_ids``: the generated tokens the host has (for the penalties; empty when the request has none);
    ``prompt_ids``: the decoded context's prompt (the repetition penalty's; empty when it is off);
    ``pending``: the step's input token is a generated token the host does not have yet (the step in flight's);
    ``stop_ids``: the ids to rule out, the request having generated fewer than ``min_tokens`` (pending included);
    ``seed``: a seeded sampled request's seed (its low and high 32 bits) and the number of this draw
    (:mod:`amulet_core.sampling.seeded`).
    """

    output_ids: Sequence[int] = ()
    prompt_ids: Sequence[int] = ()
    pending: bool = False
    stop_ids: Sequence[int] = ()
    seed: tuple[int, int, int] | None = None


NO_HISTORY = TailHistory()

SEEN, OUTPUT = 1, 2
"""Kinds of a penalties' table entry (:func:`history_table`; 0: padding): a prompt token (seen), a generated one."""


@dataclass(frozen=True)
class TailRow:
    """One request's rows in the step's (padded) logits, and its method's and sampling's numbers."""

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
    extra: tuple[int, ...] = ()
    """The rows of preference contexts 2..K (empty for K = 1)."""
    weights: tuple[float, ...] = ()
    """The normalised weights of those contexts (the first context's is implicit), one per ``extra`` row."""
    bias: tuple[tuple[int, float], ...] = ()
    """``logit_bias``: (token id, bias) pairs."""
    top_n: int = 0
    """Top log-probabilities to report (0: none)."""
    penalties: tuple[float, float, float] = (1.0, 0.0, 0.0)
    """Repetition, frequency and presence penalties (off: 1, 0, 0)."""
    history: TailHistory = NO_HISTORY

    @property
    def plain(self) -> bool:
        """One context row: its own log-softmax, never the plausibility pass."""
        return self.contrast is None and not self.extra

    @property
    def rows(self) -> tuple[int, ...]:
        """All its context rows."""
        return (self.primary, *self.extra, *(() if self.contrast is None else (self.contrast,)))

    @property
    def penalized(self) -> bool:
        return self.penalties != (1.0, 0.0, 0.0)


def tail_rows(
    specs: Sequence[RowSpec],
    row_of: Sequence[int],
    params: Sequence[SamplingParams],
    histories: Sequence[TailHistory] | None = None,
) -> list[TailRow]:
    """The tail's rows of ``specs``, whose row numbers index ``row_of`` (the logits' rows in the padded step), each
    sampled with ``params`` (``histories``: what the processors read; None: nothing generated yet)."""
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
            tuple(row_of[r] for r in s.extra_rows),
            s.weights[1:],
            p.logit_bias,
            p.top_logprobs if p.logprobs else 0,
            (p.repetition_penalty, p.frequency_penalty, p.presence_penalty),
            NO_HISTORY if histories is None else histories[i],
        )
        for i, (s, p) in enumerate(zip(specs, params, strict=True))
    ]


def width_for(needed: int, widths: Sequence[int]) -> int | None:
    """The first of ``widths`` that holds ``needed`` entries (0 for none needed); None when none does."""
    if needed <= 0:
        return 0
    return next((w for w in widths if w >= needed), None)


def history_bound(row: TailRow) -> int:
    """Columns of the penalties' table the row needs at most (:func:`history_table` leaves out ids outside the
    vocabulary), without reading its history."""
    if not row.penalized:
        return 0
    return 1 + len(row.history.output_ids) + (len(row.history.prompt_ids) if row.penalties[0] != 1 else 0)


def history_table(
    rows: Sequence[TailRow], widths: Sequence[int], vocab: int
) -> tuple[int, list[list[int]], list[list[int]]] | None:
    """The step's penalties table: its width (the first of ``widths`` that holds every row; 0 when no row has a
    penalty) and each row's token ids and their kinds. Column 0 stands for the step's input token (the graph writes
    it; kind 2 when it is a pending output token, else 0), then the output ids the host has (kind 2), the prompt ids
    (kind 1: seen, not generated), padding (token 0, kind 0: counts nothing). Ids outside the vocabulary are left
    out, as the sampler's processors leave them out. None when no width holds a row."""
    tokens = []
    for row in rows:
        h = row.history
        out = [t for t in h.output_ids if 0 <= t < vocab] if row.penalized else []
        prompt = [t for t in h.prompt_ids if 0 <= t < vocab] if row.penalties[0] != 1 else []
        tokens.append((out, prompt, h.pending and row.penalized))
    if not any(row.penalized for row in rows):
        return 0, [], []
    width = width_for(1 + max(len(out) + len(prompt) for out, prompt, _ in tokens), widths)
    if width is None:
        return None
    ids, kinds = [], []
    for out, prompt, pending in tokens:
        pad = width - 1 - len(out) - len(prompt)
        ids.append([0, *out, *prompt, *[0] * pad])
        kinds.append([OUTPUT if pending else 0, *[OUTPUT] * len(out), *[SEEN] * len(prompt), *[0] * pad])
    return width, ids, kinds


def stop_table(rows: Sequence[TailRow], width: int, vocab: int) -> tuple[list[list[int]], list[bool]]:
    """Each row's stop ids to rule out (``min_tokens``), padded with its first one (a repeated write of -inf), and
    whether it has any."""
    ids, ban = [], []
    for row in rows:
        stops = sorted(t for t in row.history.stop_ids if 0 <= t < vocab)
        ids.append([*stops, *[stops[0] if stops else 0] * (width - len(stops))])
        ban.append(bool(stops))
    return ids, ban
