"""Answering with the choices of a request, whole (JSON) or as they come (SSE), for any endpoint.

An endpoint (chat, text completions) gives its choices' outputs (``generate_choices``) and, for
streaming, a :class:`ChunkFormat` that writes its own chunk objects; everything else is here: the
disconnect watch, the request's report to the observer, the 429/503 before a stream starts, the
error event once it has, and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from amulet_core.engine.parallel_sampling import ChoiceOutput
from amulet_core.engine.protocol import GenerationOutput, TokenLogprob, Usage
from amulet_core.errors import (
    AmuletError,
    EngineNotReadyError,
    EngineOverloadedError,
    InvalidParameterError,
    RequestFailedError,
)
from server.errors import describe_exception, error_payload
from server.request_id import request_id_of
from server.serving_engine import ClientDisconnected, RequestTracker, iterate_until_disconnect

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""Status logged for an answer nobody is left to read (the client went away)."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class ChoiceResult:
    """One choice, whole: its text, tokens, log-probabilities and finish reason."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    final: GenerationOutput | None = None
    """The output that finished the choice (its error, if any)."""

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, out: GenerationOutput) -> None:
        self.texts.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.finished:
            self.finish_reason, self.final = out.finish_reason, out


def overall_reason(reasons: list[str | None]) -> str:
    """The request's finish reason for the observer: "length" if any choice ran out, else "stop"."""
    return "length" if "length" in reasons else "stop"


async def run_to_end(
    outputs: AsyncIterator[ChoiceOutput], num_choices: int, raw_request: Request, tracker: RequestTracker
) -> list[ChoiceResult] | None:
    """Every choice whole, in index order; None when the client went away. Raises the error of a choice
    that did not finish with stop or length (the whole request fails, as one answer)."""
    results = [ChoiceResult(i) for i in range(num_choices)]
    try:
        async with aclosing(iterate_until_disconnect(outputs, raw_request, tracker)) as stream:
            async for choice in stream:
                results[choice.index].add(choice.output)
    except BaseException as exc:
        if settle(tracker, exc):
            return None
        raise
    for result in results:
        if result.finish_reason not in ("stop", "length"):
            tracker.finish("abort" if result.finish_reason == "abort" else "error")
            raise unfinished(result.final, request_id_of(raw_request.scope))
    tracker.finish(overall_reason([r.finish_reason for r in results]))
    return results


class ChunkFormat(Protocol):
    """An endpoint's SSE chunks (each returns the ``data:`` event text)."""

    def opening(self, num_choices: int) -> list[str]:
        """Events before any token (chat: each choice's role; text completions: none)."""
        ...

    def delta(self, choice: ChoiceOutput) -> list[str]:
        """The events of a choice's new text (none when it carries nothing to send yet)."""
        ...

    def finish(self, index: int, reason: str) -> list[str]:
        """The events that end a choice."""
        ...

    def usage(self, usage: Usage) -> str:
        """The last event, when the client asked for usage."""
        ...


async def stream_response(
    outputs: AsyncGenerator[ChoiceOutput, None],
    num_choices: int,
    chunks: ChunkFormat,
    include_usage: bool,
    raw_request: Request,
    tracker: RequestTracker,
    retry_after_s: int,
) -> Response:
    """A 200 SSE answer, or the error status when the request is refused before its first output."""
    watched = iterate_until_disconnect(outputs, raw_request, tracker)
    # Wait for the first output before answering, so that a full queue or an unloaded model still
    # gets its HTTP status (429, 503): once a 200 stream has begun, only an error event is possible.
    try:
        first = await anext(watched, None)
    except BaseException as exc:
        await watched.aclose()
        if settle(tracker, exc):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise
    request_id = request_id_of(raw_request.scope)
    events = _events(first, watched, num_choices, chunks, include_usage, tracker, retry_after_s, request_id)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    first: ChoiceOutput | None,
    outputs: AsyncGenerator[ChoiceOutput, None],
    num_choices: int,
    chunks: ChunkFormat,
    include_usage: bool,
    tracker: RequestTracker,
    retry_after_s: int,
    request_id: str | None,
) -> AsyncIterator[str]:
    gone = False
    reasons: list[str | None] = [None] * num_choices
    try:
        for opening in chunks.opening(num_choices):
            yield opening
        failed: ChoiceOutput | None = None
        async for choice in _prepend(first, outputs):
            for delta in chunks.delta(choice):
                yield delta
            out = choice.output
            if out.finished:
                if out.finish_reason not in ("stop", "length"):
                    failed = choice
                    break
                reasons[choice.index] = out.finish_reason
                for event in chunks.finish(choice.index, out.finish_reason or "stop"):
                    yield event
        if failed is None and None not in reasons:
            tracker.finish(overall_reason(reasons))
            if include_usage:
                yield chunks.usage(tracker.usage())
        else:
            reason = failed.output.finish_reason if failed else None
            tracker.finish("abort" if reason == "abort" else "error")
            error = unfinished(failed.output if failed else None, request_id)
            yield sse(error_payload(describe_exception(error).info, request_id))
    except ClientDisconnected:
        tracker.finish("abort")
        gone = True  # nobody is left to read anything
    except (asyncio.CancelledError, GeneratorExit):
        tracker.finish("abort")
        raise
    except Exception as exc:
        tracker.finish("error")
        if not isinstance(exc, AmuletError):
            logger.exception("Request %s: the stream failed", request_id)
        yield sse(error_payload(describe_exception(exc, retry_after_s).info, request_id))
    finally:
        await outputs.aclose()
    if not gone:
        yield sse("[DONE]")


def settle(tracker: RequestTracker, exc: BaseException) -> bool:
    """Record how a request that raised ended; True when the client went away (nothing to answer)."""
    if isinstance(exc, ClientDisconnected):
        tracker.finish("abort")
        return True
    if isinstance(exc, (EngineOverloadedError, EngineNotReadyError, InvalidParameterError)):
        tracker.cancel()  # refused before it started: not a served request
    else:
        tracker.finish("abort" if isinstance(exc, asyncio.CancelledError) else "error")
    return False


def unfinished(final: GenerationOutput | None, request_id: str | None) -> Exception:
    """The error for a generation that ended without stop/length (``final``: the output that ended it, None when
    the engine ended it without one). One its own input failed (``client_error``: e.g. its grammar ran past
    llguidance's limits) is that 400 error; another failed one is logged here with the engine's reason and
    ``request_id``, and the client gets only the stable ``generation_failed`` answer."""
    if final is not None and final.finish_reason == "abort":
        return EngineNotReadyError("The request was aborted: the server is shutting down.")
    if final is not None and final.client_error is not None:
        logger.info("Request %s failed on its input: %s", request_id, final.client_error.message)
        return final.client_error
    error = final.error if final is not None else None
    logger.error("Request %s failed: %s", request_id, error or "the engine gave no reason")
    return RequestFailedError(error or "The generation failed.")


async def _prepend(first: ChoiceOutput | None, rest: AsyncIterator[ChoiceOutput]) -> AsyncIterator[ChoiceOutput]:
    if first is None:  # the engine ended without any output
        return
    yield first
    async for out in rest:
        yield out
