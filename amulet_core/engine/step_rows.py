"""A step's requests as rows of its logits: where each request's rows are, how its method reads them, and what the
sampler and the ``min_tokens`` rule need of them. Pure functions of the requests' states (and the logits)."""

from __future__ import annotations

import torch

from amulet_core.device_tensors import to_device
from amulet_core.engine.overlap import PENDING_TOKEN
from amulet_core.engine.request_state import RequestState
from amulet_core.engine.tail_rows import NO_HISTORY, TailHistory
from amulet_core.grammar.masks import GrammarMasks, grammar_masks
from amulet_core.method.rows import RowSpec
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import RowHistory
from amulet_core.sampling.seeded import SeededDraws


def request_rows(states: list[RequestState]) -> list[range]:
    """Each request's rows of the step's logits (its sequences', in order)."""
    rows, start = [], 0
    for state in states:
        rows.append(range(start, start + len(state.group.seqs)))
        start += len(state.group.seqs)
    return rows


def row_specs(states: list[RequestState]) -> list[RowSpec]:
    """How each request's rows make its distribution: preference contexts 1..K, then the contrast context."""
    specs: list[RowSpec] = []
    for state, rows in zip(states, request_rows(states), strict=True):
        k = state.num_prefs
        contrast = rows.start + k if len(state.group.seqs) > k else None
        specs.append(
            RowSpec.of(range(rows.start, rows.start + k), state.weights, contrast, state.request.method, state.step_coefficient)
        )
    return specs


def plausible_contrast_rows(states: list[RequestState]) -> list[int]:
    """The contrast rows of the step's requests that have a plausibility mask (la and amulet with ``plausibility``
    above 0): their logits are needed at the plausible tokens only (:mod:`amulet_core.method.partial_contrast`)."""
    return [s.contrast for s in row_specs(states) if s.contrast is not None and s.method.plausibility > 0]


def rule_out_early_stops(states: list[RequestState], logits: torch.Tensor) -> None:
    """``min_tokens``: until a request has generated that many tokens, its stop ids are made impossible in each of
    its contexts' logits, in place, before its method combines them. A stop id then weighs nothing in the
    combination and amulet's plausibility mask counts from the most likely token that may come (as for a
    grammar's mask): it can no longer keep a stop id alone, which the ``min_tokens`` processor would then rule
    out, leaving no token to choose (the request failed)."""
    if all(len(s.output_ids) >= s.request.sampling.min_tokens for s in states):
        return  # the common case: nothing to rule out
    rows: list[int] = []
    ids: list[int] = []
    for state, span in zip(states, request_rows(states), strict=True):
        if len(state.output_ids) >= state.request.sampling.min_tokens:
            continue
        stops = [t for t in state.stop_ids if 0 <= t < logits.shape[-1]]
        for row in span:
            rows += [row] * len(stops)
            ids += stops
    if rows:
        where = (to_device(rows, logits.device, torch.long), to_device(ids, logits.device, torch.long))
        with torch.inference_mode():  # the runner's logits are an inference tensor
            logits.index_put_(where, torch.tensor(float("-inf"), device=logits.device))


def row_history(state: RequestState) -> RowHistory:
    """What the sampler's penalties and ``min_tokens`` read of a request (no copies of the token lists)."""
    sp = state.request.sampling
    return RowHistory(
        output_ids=state.output_ids,
        prompt_ids=state.request.prompt_ids if sp.repetition_penalty != 1 else (),
        stop_ids=state.stop_ids if len(state.output_ids) < sp.min_tokens else (),
    )


def tail_history(state: RequestState) -> TailHistory:
    """What the decode graph's tail reads of a request's tokens for its penalties and ``min_tokens``: the output ids
    the host has, whether the step's input token is a pending output (the step in flight's), the prompt (repetition
    penalty), the stop ids while fewer than ``min_tokens`` tokens are generated, the pending one included; and a
    seeded request's seed and draw number."""
    sp = state.request.sampling
    draws = state.generator
    seed = (*draws.halves, draws.draws) if isinstance(draws, SeededDraws) else None
    if not sp.needs_history:
        return NO_HISTORY if seed is None else TailHistory(seed=seed)
    pending = state.group.seqs[0].token_ids[-1] == PENDING_TOKEN
    generated = len(state.output_ids) + pending
    return TailHistory(
        output_ids=state.output_ids,
        prompt_ids=state.request.prompt_ids if sp.repetition_penalty != 1 else (),
        pending=pending,
        stop_ids=tuple(state.stop_ids) if generated < sp.min_tokens else (),
        seed=seed,
    )


def step_masks(states: list[RequestState], vocab: int, device: torch.device | str = "cpu") -> GrammarMasks | None:
    """The grammar masks of the step's constrained requests (numbered as ``states``; each one's
    :meth:`RequestState.mask_filler`: none inside a thinking span) over ``vocab`` tokens on ``device``, all at once;
    None when no request is constrained."""
    fillers = [state.mask_filler() for state in states]
    constrained = [(i, f) for i, f in enumerate(fillers) if f is not None]
    if not constrained:
        return None
    return grammar_masks([i for i, _ in constrained], [f for _, f in constrained], vocab, device)


def tail_inputs(states: list[RequestState]) -> tuple[list[RowSpec], list[SamplingParams], list[TailHistory]]:
    """What the decode graph's tail reads of a step's requests: their row specs, sampling parameters and histories
    (:func:`row_specs`, :func:`tail_history`)."""
    return row_specs(states), [s.request.sampling for s in states], [tail_history(s) for s in states]
