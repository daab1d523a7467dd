"""Next-token choice: apply each request's method to its context rows, then sample every row at once.

Method application is batched (``amulet_core.method.rows``, called by the engine first): all multi-context
requests of a step are combined in one closed-form call. Sampling is batched too (:func:`sample_tokens`):
the logits processors (``logit_bias``, ``min_tokens``, penalties: ``amulet_core.sampling.processors``) run over the rows that
ask for them, greedy rows share one argmax, temperature, min-p, top-k and top-p are tensor ops over
all sampled rows with per-row parameters, and only the draw itself is per row: an unseeded row's multinomial
draw from the default generator, the seeded rows' exponential race with their seeds' counter-based noise
(:mod:`amulet_core.sampling.seeded`, in one pass), so that a seeded request gives the same tokens whichever requests
share its step, and the same as the decode graph's tail gives it. The
chosen tokens, their log-probabilities and the requested top log-probabilities come back to the host
in one copy (:func:`sample_on_device` queues the work, :func:`read_samples` reads the copy: an engine overlapping its
host work with the device's reads it a step later). :func:`choose_token` is the straightforward per-row sampler, kept
as the batched one's oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from amulet_core.device_tensors import host_to_device, to_device
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import RowHistory, apply_processors_, process_row
from amulet_core.sampling.seeded import SeededDraws, seeded_race

Generator = torch.Generator | SeededDraws | None
"""What a sampled row draws with: None, the default generator (an unseeded request); :class:`SeededDraws`, its seed's
counter-based draws (a seeded request: :mod:`amulet_core.sampling.seeded`); a ``torch.Generator``, a multinomial
draw from it (the tests' own generators)."""


def make_generator(params: SamplingParams) -> SeededDraws | None:
    """The draws of a seeded sampled request (its seed's, the same on the host and in a decode graph, on any device);
    None for greedy or unseeded ones."""
    if params.greedy or params.seed is None:
        return None
    return SeededDraws(params.seed)


def _log_min_p(min_p: float) -> float:
    return math.log(min_p) if min_p > 0 else float("-inf")


def _filtered_probs(logprobs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logprobs / params.temperature
    if params.min_p > 0:  # p < min_p * p_max, in log space: score < max score + log(min_p)
        threshold = scores.max() + torch.tensor(_log_min_p(params.min_p), dtype=torch.float32)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


_NOT_FINITE = (
    "no token can be chosen: the distribution is not finite or has no mass (logit_bias or min_tokens ruled "
    "out every token, or the temperature is too small for these logits)"
)


def choose_token(logprobs: torch.Tensor, params: SamplingParams, generator: Generator, history: RowHistory | None = None) -> int:
    """One token id from one request's ``[V]`` log-probabilities, after its logits processors (``history``:
    see ``RowHistory``; None = nothing generated yet). Raises ValueError where no token can be chosen."""
    scores = process_row(logprobs, params, history)
    if params.greedy:
        if not bool(torch.isfinite(scores.max())):
            raise ValueError(_NOT_FINITE)
        return int(scores.argmax())
    probs = _filtered_probs(scores, params)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError(_NOT_FINITE)
    if isinstance(generator, SeededDraws):
        return int(seeded_race(probs.unsqueeze(0), [generator])[0].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class RowSample:
    """One row's outcome: the token, its log-probability, the top alternatives, or why it failed."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    error: str | None = None


@dataclass
class _SampledRows:
    index: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    generators: list[Generator] = field(default_factory=list)


def _batched_filtered_probs(logprobs: torch.Tensor, rows: _SampledRows) -> torch.Tensor:
    """:func:`_filtered_probs` for many rows at once, each with its own parameters (same arithmetic)."""
    vocab = logprobs.shape[-1]
    device = logprobs.device
    # Per row, ``logprobs / t`` with a Python float divides by the float32 scalar; so does this.
    temperature = host_to_device(torch.tensor(rows.temperature, dtype=torch.float64).to(logprobs.dtype), device)
    scores = logprobs / temperature.unsqueeze(1)
    if any(m > 0 for m in rows.min_p):
        log_min_p = to_device([_log_min_p(m) for m in rows.min_p], device, torch.float32).unsqueeze(1)
        scores.masked_fill_(scores < scores.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))  # a fresh tensor
    ks = [k if 0 < k < vocab else 0 for k in rows.top_k]
    if any(ks):
        k_max = max(ks)
        values = torch.topk(scores, k_max, dim=-1).values
        kth_index = to_device([max(k, 1) - 1 for k in ks], device, torch.long).unsqueeze(1)
        kth = values.gather(1, kth_index)
        kth = kth.masked_fill(to_device([k == 0 for k in ks], device).unsqueeze(1), float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if any(p < 1.0 for p in rows.top_p):
        top_p = host_to_device(torch.tensor(rows.top_p, dtype=torch.float64).to(probs.dtype), device).unsqueeze(1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = (cumulative - sorted_probs > top_p) & (top_p < 1.0)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


@dataclass(frozen=True)
class DeviceSamples:
    """A step's choices still on the device (:func:`sample_on_device`): ``tokens`` ``[R]``, and in ``packed`` (float64)
    everything the host reads of them, for one device-to-host copy (:func:`read_samples`)."""

    tokens: torch.Tensor
    packed: torch.Tensor
    top_n: int


def sample_tokens(
    logprobs: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Generator],
    histories: Sequence[RowHistory | None] | None = None,
) -> list[RowSample]:
    """One token for every row of ``[R, V]`` log-probabilities, row i decoded with ``params[i]``.

    ``histories[i]`` is what row i's logits processors need (``RowHistory``); None, or no ``histories``,
    means nothing generated yet, which is all a row without penalties or ``min_tokens`` needs. Gives
    the tokens :func:`choose_token` gives row by row with the same generators and histories. A row
    where no token can be chosen (not finite, or every token ruled out) gets ``error`` set (its request
    fails alone). The reported log-probability of the chosen token and the top-``top_logprobs`` pairs
    are those of the method's distribution before the processors (vLLM's default, raw log-probabilities).
    They come back with the tokens in one device-to-host copy. ``logprobs`` is edited in place while
    the tokens are chosen and restored exactly before this returns (where it raises, it may be left edited).
    """
    if logprobs.shape[0] == 0:
        return []
    chosen = sample_on_device(logprobs, params, generators, histories)
    return read_samples(chosen.packed.tolist(), params, chosen.top_n)  # the one device-to-host copy


def sample_on_device(
    logprobs: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Generator],
    histories: Sequence[RowHistory | None] | None = None,
) -> DeviceSamples:
    """:func:`sample_tokens` up to the copy: every operation is queued on the device, none waits for it (a row
    that cannot be chosen is flagged, not raised), so the host can go on while the device works."""
    num_rows = logprobs.shape[0]
    device = logprobs.device
    logprobs = logprobs.contiguous()
    if logprobs.is_inference() and not torch.is_inference_mode_enabled():
        logprobs = logprobs.clone()  # editing an inference tensor in place needs inference mode
    restore = apply_processors_(logprobs, params, histories)  # in place, undone below: no [R, V] copy
    scores = logprobs
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = _SampledRows()
    for i, p in enumerate(params):
        if not p.greedy:
            sampled.index.append(i)
            sampled.temperature.append(p.temperature)
            sampled.top_k.append(p.top_k)
            sampled.top_p.append(p.top_p)
            sampled.min_p.append(p.min_p)
            sampled.generators.append(generators[i])
    tokens = torch.empty(num_rows, dtype=torch.long, device=device)
    bad = torch.zeros(num_rows, dtype=torch.bool, device=device)
    if len(greedy) == num_rows:
        best, tokens = scores.max(dim=-1)  # the first maximum on ties, as argmax
        bad = ~torch.isfinite(best)
    elif greedy:
        greedy_rows = to_device(greedy, device, torch.long)
        best, greedy_tokens = scores.index_select(0, greedy_rows).max(dim=-1)
        tokens[greedy_rows] = greedy_tokens
        bad[greedy_rows] = ~torch.isfinite(best)
    if sampled.index:
        rows = to_device(sampled.index, device, torch.long)
        every = len(sampled.index) == num_rows
        probs = _batched_filtered_probs(scores if every else scores.index_select(0, rows), sampled)
        # Softmax gives values in [0, 1] or NaN, so a NaN, or no mass, shows in the sum (one cheap pass).
        row_bad = ~(probs.sum(dim=-1) > 0)
        # A failed row draws from a harmless stand-in, so the batch needs no sync before the draws.
        probs.masked_fill_(row_bad.unsqueeze(1), 1.0)  # a fresh tensor
        tokens[rows] = _draws(probs, sampled.generators)
        bad[rows] = row_bad
    if restore is not None:
        restore()  # the raw log-probabilities again, for the reported ones
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    parts = [tokens.double(), chosen.double(), bad.double()]
    top_n = max(p.top_logprobs if p.logprobs else 0 for p in params)
    if top_n:
        values, ids = torch.topk(logprobs, top_n, dim=-1)
        parts += [values.double().reshape(-1), ids.double().reshape(-1)]
    return DeviceSamples(tokens, torch.cat(parts), top_n)


def _draws(probs: torch.Tensor, generators: Sequence[Generator]) -> torch.Tensor:
    """One token per row of ``probs``: a multinomial draw from the row's generator (the default one for None), or
    its seed's counter-based race (:class:`SeededDraws`, all such rows in one pass)."""
    seeded = [j for j, g in enumerate(generators) if isinstance(g, SeededDraws)]
    if not seeded:
        return torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(generators)])  # type: ignore[arg-type]
    drawn = torch.empty(len(generators), dtype=torch.long, device=probs.device)
    for j, g in enumerate(generators):
        if not isinstance(g, SeededDraws):
            drawn[j : j + 1] = torch.multinomial(probs[j], 1, generator=g)
    where = to_device(seeded, probs.device, torch.long)
    by_seed = [g for g in generators if isinstance(g, SeededDraws)]
    return drawn.index_copy_(0, where, seeded_race(probs.index_select(0, where), by_seed))


def read_samples(host: list[float], params: Sequence[SamplingParams], top_n: int) -> list[RowSample]:
    """The rows' outcomes from :class:`DeviceSamples`' ``packed`` values once on the host."""
    num_rows = len(params)
    results = []
    for i, p in enumerate(params):
        top: tuple[tuple[int, float], ...] = ()
        n = p.top_logprobs if p.logprobs else 0
        if n:
            base = 3 * num_rows + i * top_n
            ids_base = base + num_rows * top_n
            top = tuple((int(host[ids_base + j]), host[base + j]) for j in range(n))
        error = _NOT_FINITE if host[2 * num_rows + i] else None
        results.append(RowSample(int(host[i]), host[num_rows + i], top, error))
    return results
