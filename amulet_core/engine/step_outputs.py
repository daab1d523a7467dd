"""A step's chosen tokens taken by their requests, one output each (:func:`step_outputs`).

Everything here is per request: one whose token fails it (its grammar, its detokeniser, the token's own error, a
Rust panic in tokenizers or llguidance) is finished with an error alone, and the others go on. A request's own
input failing it (its grammar: :class:`~amulet_core.errors.InvalidParameterError`) is a client error; anything else
that :func:`~amulet_core.errors.is_request_failure` names is a server one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from amulet_core.engine.protocol import GenerationOutput, GenerationRequest, TokenLogprob
from amulet_core.engine.request_state import RequestState
from amulet_core.errors import InvalidParameterError, is_request_failure
from amulet_core.sampling.sampler import RowSample

logger = logging.getLogger(__name__)


def step_outputs(
    states: Sequence[RequestState],
    samples: Sequence[RowSample],
    positions: Sequence[tuple[int, ...]] | None,
    tokenizer: Any,
    drop: Callable[[RequestState], RequestState],
    fault_hook: Callable[[GenerationRequest], None] | None = None,
) -> list[GenerationOutput]:
    """Each request's token (``samples``, in ``states``' order) accepted, appended or put at ``positions`` (in place
    of its placeholders), and its output; ``drop`` removes a finished request from the engine (freeing its KV) and
    returns it; ``fault_hook`` (test-only) is called for each request first, and what it raises fails that request."""
    outputs = []
    now = time.monotonic()
    for i, (state, sample) in enumerate(zip(states, samples, strict=True)):
        try:
            if state.prefill_s is None and state.scheduled_at is not None:
                state.prefill_s = now - state.scheduled_at
            if fault_hook is not None:
                fault_hook(state.request)
            if state.matcher is not None and state.matcher.failure is not None:
                raise state.matcher.failure  # its grammar failed filling this step's mask
            if sample.error is not None:
                raise ValueError(state.no_token_message(sample.error))
            outputs.append(_accept(state, sample, None if positions is None else positions[i], tokenizer, drop))
        except InvalidParameterError as exc:  # the request's own input failed it (its grammar): a client error
            logger.info("request %s failed: %s", state.request.request_id, exc.message)
            outputs.append(drop(state).finish("error", exc.message, client_error=exc))
        except BaseException as exc:  # a Rust panic (tokenizers, llguidance) is a BaseException: this request's too
            if not is_request_failure(exc):
                raise
            logger.exception("request %s failed", state.request.request_id)
            outputs.append(drop(state).finish("error", f"Decoding failed: {type(exc).__name__}: {exc}"))
    return outputs


def _accept(
    state: RequestState,
    sample: RowSample,
    positions: tuple[int, ...] | None,
    tokenizer: Any,
    drop: Callable[[RequestState], RequestState],
) -> GenerationOutput:
    reason, text = state.accept(sample.token, positions)
    logprobs = token_logprobs(sample, tokenizer) if state.request.sampling.logprobs else None
    if reason is not None:
        return drop(state).finish(reason, text=text, token_ids=(sample.token,), logprobs=logprobs)
    return GenerationOutput(state.request.request_id, text, (sample.token,), logprobs)


def token_logprobs(sample: RowSample, tokenizer: Any) -> tuple[TokenLogprob, ...]:
    """The chosen token's log-probability and its top alternatives', with their texts."""
    decode = tokenizer.decode
    pairs = tuple((i, decode([i]), v) for i, v in sample.top)
    return (TokenLogprob(sample.token, decode([sample.token]), sample.logprob, pairs),)
