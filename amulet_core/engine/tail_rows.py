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

from array import array
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


@dataclass(frozen=True)
class HistoryTable:
    """The step's penalties table (:func:`history_table`): ``width`` columns a row; ``ids`` (C ints), row after row,
    column 0 standing for the step's input token (the graph writes it), then the row's output ids the host has, then
    its prompt ids (when it has a repetition penalty), then padding (token 0); ``lengths``: each row's number of output
    ids, prompt ids, and 1 where its input token is a pending output token (else 0). The kinds of the columns follow
    from the lengths: 1..outputs generated (and 0 when pending), the next prompt ones seen, the rest nothing. Ids
    outside the vocabulary may stand in it: the graph counts them nowhere, as the sampler's processors leave them
    out."""

    width: int
    ids: array
    lengths: list[list[int]]


def history_table(rows: Sequence[TailRow], widths: Sequence[int], vocab: int) -> HistoryTable | None:
    """The step's penalties table (:class:`HistoryTable`), as wide as the first of ``widths`` that holds every row
    (width 0 when no row has a penalty); None when none does. The ids are copied as C ints, without a loop in Python
    (a 64-request step with 2,000-token histories: 128,000 ids); only a row with an id that no C int holds is filtered
    to the vocabulary first."""
    if not any(row.penalized for row in rows):
        return HistoryTable(0, array("i"), [])
    width = width_for(max(history_bound(row) for row in rows), widths)
    if width is None:
        return None
    ids = array("i")
    lengths: list[list[int]] = [[], [], []]
    for row in rows:
        h = row.history
        ids.append(0)
        out = _extend(ids, h.output_ids, vocab) if row.penalized else 0
        prompt = _extend(ids, h.prompt_ids, vocab) if row.penalized and row.penalties[0] != 1 else 0
        ids.frombytes(bytes(ids.itemsize * (width - 1 - out - prompt)))  # padding: token 0, counted nowhere
        lengths[0].append(out)
        lengths[1].append(prompt)
        lengths[2].append(int(h.pending and row.penalized))
    return HistoryTable(width, ids, lengths)


def _extend(ids: array, values: Sequence[int], vocab: int) -> int:
    """``values`` appended to ``ids``; how many. Where one is past what a C int holds, those outside the vocabulary
    are left out."""
    start = len(ids)
    try:
        ids.extend(values)
    except OverflowError:
        del ids[start:]
        ids.extend([t for t in values if 0 <= t < vocab])
    return len(ids) - start


def stop_table(rows: Sequence[TailRow], width: int, vocab: int) -> tuple[list[list[int]], list[bool]]:
    """Each row's stop ids to rule out (``min_tokens``), padded with its first one (a repeated write of -inf), and
    whether it has any."""
    ids, ban = [], []
    for row in rows:
        stops = sorted(t for t in row.history.stop_ids if 0 <= t < vocab)
        ids.append([*stops, *[stops[0] if stops else 0] * (width - len(stops))])
        ban.append(bool(stops))
    return ids, ban
