"""The logits processors of the decode graph's tail (:mod:`amulet_core.engine.decode_tail`): ``logit_bias``,
``min_tokens`` and the repetition, frequency and presence penalties, from static per-request tables that the host
fills before the replay, in the sampler's arithmetic (:mod:`amulet_core.sampling.processors`).

* ``logit_bias``: each request's (token, bias) pairs, padded with (0, 0.0), added once per entry in float32.
* ``min_tokens``: each request's stop ids (padded with its first), set to -inf while they are ruled out, in its
  first preference row before the method (which leaves them -inf in the distribution and the scores: see
  :mod:`amulet_core.engine.decode_tail`).
* penalties: each request's token ids (:func:`~amulet_core.engine.tail_rows.history_table`; column 0 is the step's
  input token, read from the graph's token ids: the pending output of the step in flight when the host is
  overlapped) and how many of them are generated and how many seen in the prompt (each column's kind follows, worked
  out in the graph), counted over the whole vocabulary with two scatter-adds, then
  :func:`~amulet_core.sampling.processors.penalize` over whole rows (a token never seen keeps its score exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from amulet_core.device_tensors import host_to_device, to_device
from amulet_core.engine.tail_rows import TailRow, history_bound, history_table, stop_table, width_for
from amulet_core.sampling.params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from amulet_core.sampling.processors import penalize

BIAS_WIDTHS = (16, 128, MAX_LOGIT_BIAS)
"""The widths of the ``logit_bias`` table a tail variant holds (the step's largest bias, rounded up): a few variants,
and a step with a small bias adds few padding entries (exact zeros)."""
STOP_WIDTHS = (8, 64, 2 * MAX_STOP_TOKEN_IDS)
"""The same for ``min_tokens``' stop ids (``stop_token_ids`` and the end-of-text ids)."""
FIRST_HISTORY_WIDTH = 64
"""The penalties' table is as wide as the step's longest history (the input token, the output ids the host has, the
prompt for a repetition penalty), rounded up to a power of two from this, up to the longest context."""


class TailProcessors:
    """The processors' static tables for up to ``max_requests`` requests over a vocabulary of ``vocab``, with
    histories of up to ``max_history`` tokens (the longest context and the input token).

    Contract: :meth:`set` (the step's rows) before the launch; :meth:`rule_out` and :meth:`apply` inside it."""

    def __init__(self, max_requests: int, vocab: int, max_history: int, device: torch.device) -> None:
        self.vocab = vocab
        self.bias_tokens = torch.zeros(max_requests, MAX_LOGIT_BIAS, dtype=torch.long, device=device)
        self.bias_values = torch.zeros(max_requests, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        self.stops = torch.zeros(max_requests, STOP_WIDTHS[-1], dtype=torch.long, device=device)
        self.ban = torch.zeros(max_requests, dtype=torch.bool, device=device)
        """Each request: its stop ids are ruled out this step."""
        self.history_widths = _powers_of_two(FIRST_HISTORY_WIDTH, max_history)
        self.history = torch.zeros(max_requests, self.history_widths[-1], dtype=torch.int32, device=device)
        self.lengths = torch.zeros(3, max_requests, dtype=torch.long, device=device)
        """Each request's output ids in its table, prompt ids after them, and 1 where column 0 is a pending output."""
        self.penalties = torch.tensor([[1.0], [0.0], [0.0]], device=device).repeat(1, max_requests)
        """Each request's repetition, frequency and presence penalties."""

    def problem(self, rows: Sequence[TailRow]) -> str | None:
        """Why these rows do not fit the tables (a bias outside the vocabulary, a history longer than the longest
        context ...), or None."""
        for row in rows:
            if len(row.bias) > MAX_LOGIT_BIAS or any(not 0 <= token < self.vocab for token, _ in row.bias):
                return f"a logit bias of {len(row.bias)} tokens, or outside the vocabulary of {self.vocab}"
            if len(row.history.stop_ids) > STOP_WIDTHS[-1]:
                return f"{len(row.history.stop_ids)} stop ids to rule out, at most {STOP_WIDTHS[-1]}"
        if max(history_bound(row) for row in rows) > self.history_widths[-1]:
            return f"a history past the penalties' table of {self.history_widths[-1]} tokens"
        return None

    def set(self, rows: Sequence[TailRow]) -> tuple[int, int, int]:
        """The rows' tables; the widths the step needs of the bias, stop-id and penalties' tables (0: none)."""
        n, device = len(rows), self.history.device
        bias = width_for(max(len(r.bias) for r in rows), BIAS_WIDTHS) or 0
        if bias:
            tokens = [[t for t, _ in r.bias] + [0] * (bias - len(r.bias)) for r in rows]
            values = [[b for _, b in r.bias] + [0.0] * (bias - len(r.bias)) for r in rows]
            self.bias_tokens[:n, :bias].copy_(to_device(tokens, device, torch.long))
            self.bias_values[:n, :bias].copy_(to_device(values, device, torch.float32))
        stops = width_for(max(len(r.history.stop_ids) for r in rows), STOP_WIDTHS) or 0
        if stops:
            ids, ban = stop_table(rows, stops, self.vocab)
            self.stops[:n, :stops].copy_(to_device(ids, device, torch.long))
            self.ban[:n].copy_(to_device(ban, device, torch.bool))
        table = history_table(rows, self.history_widths, self.vocab)
        if table is None:
            raise ValueError(f"a history past the penalties' table of {self.history_widths[-1]} tokens")
        history = table.width
        if history:
            table_ids = torch.frombuffer(table.ids, dtype=torch.int32).view(n, history)
            self.history[:n, :history].copy_(host_to_device(table_ids, device))
            self.lengths[:, :n].copy_(to_device(table.lengths, device, torch.long))
            numbers = [[r.penalties[i] for r in rows] for i in range(3)]
            self.penalties[:, :n].copy_(to_device(numbers, device, torch.float32))
        return bias, stops, history

    def rule_out(self, x: torch.Tensor, slots: int, width: int) -> None:
        """-inf in place at the stop ids of the rows (of the first ``slots`` requests) whose stop ids are ruled out;
        the other rows' entries are written back as they were."""
        stops = self.stops[:slots, :width]
        x.scatter_(1, stops, torch.where(self.ban[:slots].unsqueeze(1), -math.inf, x.gather(1, stops)))

    def apply(self, logprobs: torch.Tensor, slots: int, widths: tuple[int, int], inputs: torch.Tensor | None) -> torch.Tensor:
        """The processed scores of ``logprobs`` (a new tensor; ``logprobs`` is left as it is): the bias, then the
        penalties, for the bias and penalties' table widths ``widths`` (:meth:`set`'s); ``inputs``: each request's
        input token this step (``[slots]``; needed for the penalties). (The stop ids of ``min_tokens`` are -inf in
        ``logprobs`` already: :meth:`rule_out` before the method.)"""
        bias, history = widths
        scores = logprobs.clone()
        if bias:
            scores.scatter_add_(1, self.bias_tokens[:slots, :bias], self.bias_values[:slots, :bias])
        if history:
            if inputs is None:
                raise ValueError("the penalties need the step's input tokens")
            ids = self.history[:slots, :history].long()
            ids = torch.cat([inputs.unsqueeze(1), ids[:, 1:]], dim=1)
            vocab = scores.shape[1]
            ids = torch.where((ids < 0) | (ids >= vocab), vocab, ids)  # counted in a column past the vocabulary
            column = torch.arange(history, device=ids.device)
            outputs, prompt, pending = self.lengths[:, :slots].unsqueeze(2)
            generated = ((column >= 1) & (column <= outputs)) | ((column == 0) & (pending > 0))
            in_prompt = (column > outputs) & (column <= outputs + prompt)
            counts = scores.new_zeros(slots, vocab + 1).scatter_add_(1, ids, generated.float())[:, :vocab]
            seen = scores.new_zeros(slots, vocab + 1).scatter_add_(1, ids, (generated | in_prompt).float())[:, :vocab] > 0
            repetition, frequency, presence = self.penalties[:, :slots].unsqueeze(2)
            scores = penalize(scores, counts, seen, repetition, (frequency, presence))
        return scores


def _powers_of_two(first: int, last: int) -> tuple[int, ...]:
    """``first``, doubling, below ``last``, then ``last`` (at least ``first``)."""
    widths, width = [], first
    while width < last:
        widths.append(width)
        width *= 2
    return (*widths, max(last, first))
