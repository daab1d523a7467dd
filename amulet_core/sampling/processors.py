"""The logits processors of OpenAI's and vLLM's sampling set, batched over a step's rows, with a per-row oracle.

They act on the ``[R, V]`` float32 log-probabilities of the distribution each request's method produced,
in this order (see ``SamplingParams``): ``logit_bias``; ``min_tokens`` (stop ids impossible while too
few tokens are generated); ``repetition_penalty`` over prompt and output tokens; ``frequency_penalty``
and ``presence_penalty`` over output tokens. :func:`apply_processors_` does it for all rows at once on the
logits' device, in place and undoably, writing only at the few positions each processor touches: the
only per-row Python work is flattening token ids and parameters into lists that go to the device in
one copy each, and rows without processing are not touched. :func:`process_row` is the straightforward
one-row version over the whole vocabulary, the batched one's oracle: both do the same float32
arithmetic per token, so they give bit-identical scores. ``min_p`` acts after temperature; it lives with top-k and top-p in
``amulet_core.sampling.sampler``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import to_device
from amulet_core.sampling.params import SamplingParams


@dataclass(frozen=True)
class RowHistory:
    """What a row's logits processors need to know about its request.

    ``output_ids``: the tokens generated so far (penalties, ``min_tokens``); ``prompt_ids``: the decoded
    context's prompt (``repetition_penalty`` only; may be empty when that penalty is off); ``stop_ids``:
    the ids that end the request (EOS unless ``ignore_eos``, and ``stop_token_ids``), made impossible
    while fewer than ``min_tokens`` tokens are generated (may be empty when ``min_tokens`` is 0). The
    sampler only reads them; ids outside the vocabulary are ignored.
    """

    output_ids: Sequence[int] = ()
    prompt_ids: Sequence[int] = ()
    stop_ids: Collection[int] = ()


NO_HISTORY = RowHistory()


def _touches_logits(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.needs_history


def _banned(p: SamplingParams, history: RowHistory, vocab: int) -> list[int]:
    """The stop ids the row may not produce yet (``min_tokens``), in ascending order."""
    if len(history.output_ids) >= p.min_tokens:
        return []
    return sorted(t for t in history.stop_ids if 0 <= t < vocab)


def _f32(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return to_device(values, device, torch.float32)


def _in_vocabulary(ids: Sequence[int], vocab: int) -> Sequence[int]:
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        return [t for t in ids if 0 <= t < vocab]
    return ids


def _penalized_values(
    values: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """Repetition, then frequency and presence penalties, on ``[n, K]`` scores of K token positions per row.

    ``counts``: each position's token's count in the output; ``seen``: bool, the token occurs in the output
    or the prompt. Elementwise, so a token gets the same value whichever positions are computed with it.
    """
    device = values.device
    repetition, frequency_presence = None, None
    if any(p.repetition_penalty != 1 for p in params):
        repetition = _f32([p.repetition_penalty for p in params], device).unsqueeze(1)
    if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
        frequency = _f32([p.frequency_penalty for p in params], device).unsqueeze(1)
        frequency_presence = (frequency, _f32([p.presence_penalty for p in params], device).unsqueeze(1))
    return penalize(values, counts, seen, repetition, frequency_presence)


def penalize(
    values: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    repetition: torch.Tensor | None,
    frequency_presence: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The penalties' arithmetic on scores, from tensors only (what a captured decode graph can run): repetition
    (``repetition`` ``[n, 1]``: divide a positive score, multiply a negative one, where ``seen``), then frequency and
    presence (``[n, 1]`` each: minus ``frequency * count + presence * (count > 0)``); None skips one. A token with a
    count of 0 that was not seen keeps its score exactly (a factor of 1, minus 0), so the scores of a whole row give
    the bits of its seen positions alone."""
    if repetition is not None:
        factor = torch.where(seen, repetition, torch.ones((), dtype=torch.float32, device=values.device))
        values = torch.where(values > 0, values / factor, values * factor)
    if frequency_presence is not None:
        frequency, presence = frequency_presence
        values = values - (frequency * counts + presence * (counts > 0).float())
    return values


@dataclass(frozen=True)
class _Penalties:
    """Where a step's penalties act, worked out before any score changes (see :func:`_penalties`)."""

    flat: torch.Tensor
    """``[n * K]`` positions in the flattened ``[R, V]`` scores: K token positions of each penalized row."""
    counts: torch.Tensor
    seen: torch.Tensor
    params: Sequence[SamplingParams]

    def apply_(self, flat_scores: torch.Tensor) -> None:
        values = flat_scores.index_select(0, self.flat).view(self.counts.shape)
        penalized = _penalized_values(values, self.counts, self.seen, self.params)
        flat_scores.index_copy_(0, self.flat, penalized.reshape(-1))


def _penalties(
    rows: Sequence[int], histories: Sequence[RowHistory], params: Sequence[SamplingParams], vocab: int, device: torch.device
) -> _Penalties:
    """The penalties of ``rows``: only at the positions of the tokens that occur in their histories.

    A token that occurs in neither the output nor the prompt is left as it is (the penalties leave it
    unchanged anyway), so the work is proportional to the history, not to the vocabulary: no
    ``[rows, V]`` buffer (on one CPU thread, zeroing two of them cost more than all the rest). Each row's
    positions are its output ids then its prompt ids (when its repetition penalty is on), padded with its
    first id, so every position holds a token the row has seen and repeated writes of a token agree.
    Output counts: one sort per row, runs of equal ids numbered by a cumulative sum, one ``scatter_add_``.
    """
    seqs: list[Sequence[int]] = []
    out_lengths: list[int] = []
    for h, p in zip(histories, params, strict=True):
        out = _in_vocabulary(h.output_ids, vocab)
        prompt = _in_vocabulary(h.prompt_ids, vocab) if p.repetition_penalty != 1 else ()
        seqs.append([*out, *prompt])
        out_lengths.append(len(out))
    width = max(1, max(len(q) for q in seqs))
    flat_ids: list[int] = []
    for q in seqs:
        flat_ids.extend(q)
        flat_ids.extend([q[0] if q else 0] * (width - len(q)))
    ids = torch.tensor(flat_ids, dtype=torch.long).view(len(seqs), width).to(device)
    is_output = torch.arange(width, device=device) < torch.tensor(out_lengths, device=device).unsqueeze(1)
    # Count each token's output positions: sort each row, number the runs of equal ids, sum the output flags per run.
    ids, order = torch.sort(ids, dim=1)
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = torch.cumsum(new_run, dim=1) - 1
    per_run = torch.zeros(ids.shape, dtype=torch.float32, device=device).scatter_add_(1, run, is_output.gather(1, order).float())
    counts = per_run.gather(1, run)
    seen = torch.tensor([bool(q) for q in seqs], device=device).unsqueeze(1).expand(-1, width)
    flat = (torch.tensor(rows, dtype=torch.long, device=device).unsqueeze(1) * vocab + ids).reshape(-1)
    return _Penalties(flat, counts, seen, params)


@dataclass(frozen=True)
class Restore:
    """Undoes :func:`apply_processors_`: writes the saved original scores back (bit-exact)."""

    flat_scores: torch.Tensor
    positions: torch.Tensor
    originals: torch.Tensor

    def __call__(self) -> None:
        self.flat_scores.index_copy_(0, self.positions, self.originals)  # repeated positions hold equal originals


def apply_processors_(
    scores: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[RowHistory | None] | None = None
) -> Restore | None:
    """``logit_bias``, ``min_tokens`` and the penalties, in place, on contiguous ``[R, V]`` float32 ``scores``,
    row i with ``params[i]``; returns what restores them exactly, or None when no row needed any of it.

    Every processor writes only at a few positions per row (the biased ids, the stop ids, the tokens of
    the history), so nothing vocabulary-wide is copied; the original values at those positions are
    saved first. ``histories[i]`` None (or no ``histories``) means nothing generated yet, no prompt and
    no stop ids.
    """
    rows = [i for i, p in enumerate(params) if _touches_logits(p)]
    if not rows:
        return None
    vocab = scores.shape[1]
    device = scores.device
    flat_scores = scores.view(-1)
    hist = {i: (histories[i] if histories is not None else None) or NO_HISTORY for i in rows}
    # 1. logit_bias and 2. min_tokens: positions and values as flat lists, one copy each.
    bias_at: list[int] = []
    biases: list[float] = []
    banned_at: list[int] = []
    for i in rows:
        p = params[i]
        for token, bias in p.logit_bias:
            bias_at.append(i * vocab + token)
            biases.append(bias)
        banned_at.extend(i * vocab + t for t in _banned(p, hist[i], vocab))
    bias_pos = to_device(bias_at, device, torch.long)
    banned_pos = to_device(banned_at, device, torch.long)
    # 3. penalties, only on the rows that have one, only where their tokens occur.
    pen = [i for i in rows if params[i].penalized]
    penalties = _penalties(pen, [hist[i] for i in pen], [params[i] for i in pen], vocab, device) if pen else None
    positions = torch.cat([bias_pos, banned_pos] + ([penalties.flat] if penalties is not None else []))
    restore = Restore(flat_scores, positions, flat_scores.index_select(0, positions))
    if bias_at:
        flat_scores.index_put_((bias_pos,), _f32(biases, device), accumulate=True)
    if banned_at:
        flat_scores.index_fill_(0, banned_pos, float("-inf"))
    if penalties is not None:
        penalties.apply_(flat_scores)
    return restore


def apply_processors(
    logprobs: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[RowHistory | None] | None = None
) -> torch.Tensor:
    """:func:`apply_processors_` on a copy: ``logprobs`` itself when no row needs processing, else new scores."""
    if not any(_touches_logits(p) for p in params):
        return logprobs
    scores = logprobs.contiguous().clone()
    apply_processors_(scores, params, histories)
    return scores


def process_row(logprobs: torch.Tensor, params: SamplingParams, history: RowHistory | None = None) -> torch.Tensor:
    """:func:`apply_processors` for one row's ``[V]`` log-probabilities, straightforwardly (the oracle)."""
    if not _touches_logits(params):
        return logprobs
    history = history or NO_HISTORY
    vocab = logprobs.shape[-1]
    device = logprobs.device
    scores = logprobs.clone()
    for token, bias in params.logit_bias:
        scores[token] = scores[token] + torch.tensor(bias, dtype=torch.float32)
    for token in _banned(params, history, vocab):
        scores[token] = float("-inf")
    if not params.penalized:
        return scores
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    for token in history.output_ids:
        if 0 <= token < vocab:
            counts[token] += 1
    in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
    if params.repetition_penalty != 1:
        for token in history.prompt_ids:
            if 0 <= token < vocab:
                in_prompt[token] = True
    if params.repetition_penalty != 1:
        repetition = torch.tensor(params.repetition_penalty, dtype=torch.float32)
        factor = torch.where((counts > 0) | in_prompt, repetition, torch.tensor(1.0))
        scores = torch.where(scores > 0, scores / factor, scores * factor)
    frequency = torch.tensor(params.frequency_penalty, dtype=torch.float32)
    presence = torch.tensor(params.presence_penalty, dtype=torch.float32)
    return scores - (frequency * counts + presence * (counts > 0).float())
