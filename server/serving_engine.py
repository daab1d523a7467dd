"""What every serving endpoint does around ``engine.generate``: abort when the client leaves, and
report the request's timings to the observer exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

from fastapi import Request

from amulet_core.engine.parallel_sampling import ChoiceOutput
from amulet_core.engine.protocol import EngineClient, GenerationRequest, Usage
from amulet_core.errors import EngineNotReadyError, InvalidParameterError
from amulet_core.model.chat_template import ChatRenderer
from server.config import ServerConfig
from server.observer import RequestObserver, RequestRecord
from server.profiles.service import PreferenceProfiles
from server.protocol import GenerationFields, PreferenceSpec
from server.requests.admission import Admission
from server.requests.limits import RequestLimits
from server.requests.policy import UnknownFieldLog
from server.requests.preparation import PreparationPool
from server.requests.tools import ConfiguredToolParser

logger = logging.getLogger(__name__)

_END = object()
BodyT = TypeVar("BodyT", bound=GenerationFields)


class OpenAIServing:
    """What every endpoint over an engine holds: the engine, the name it serves the model under, the server's
    settings, the observer of finished requests, and the :class:`Admission` of its requests.

    ``preparation``: the pool that renders and tokenizes requests, shared by the app's endpoints when given;
    without one, this endpoint makes its own from ``limits`` (default: the config's ``request_limits``).
    ``profiles``: the stored preference profiles a request may name (:meth:`resolve_profile`); none without."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        config: ServerConfig,
        observer: RequestObserver,
        unknown_fields: UnknownFieldLog,
        *,
        limits: RequestLimits | None = None,
        preparation: PreparationPool | None = None,
        profiles: PreferenceProfiles | None = None,
    ) -> None:
        self.engine = engine
        self.profiles = profiles
        self.model_name = model_name
        self.config = config
        self.observer = observer
        self.tool_parser = ConfiguredToolParser(config.tool_call_parser, lambda: engine.renderer.chat_template_text())
        limits = limits if limits is not None else preparation.limits if preparation is not None else config.request_limits
        if preparation is None:
            preparation = PreparationPool(limits, config.retry_after_s)
        self.admission = Admission(
            model_name,
            config,
            lambda: engine.max_model_len,
            lambda: engine.vocab_size,
            self.tool_parser,
            unknown_fields,
            limits=limits,
            preparation=preparation,
        )

    async def resolve_profile(self, body: BodyT, tenant: str | None) -> BodyT:
        """``body`` with a ``"preference": {"profile": ...}`` replaced by the caller's stored profile (the request's
        other preference fields over it); ``body`` itself without one. Every endpoint's preparation runs this first,
        before admission: the database is read off the event loop, and the rest sees a plain preference."""
        preference = body.preference
        if not isinstance(preference, PreferenceSpec) or preference.profile is None:
            return body
        if self.profiles is None:
            raise InvalidParameterError("preference.profile", "This server keeps no preference profiles.")
        return body.model_copy(update={"preference": await self.profiles.resolve(preference, tenant)})

    def renderer(self) -> ChatRenderer:
        """The engine's renderer; EngineNotReadyError while the model loads."""
        if not self.engine.ready:
            raise EngineNotReadyError("The model is still loading; retry later.")
        return self.engine.renderer


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was complete."""


class RequestTracker:
    """Collects one request's timings and token counts; :meth:`finish` reports them once.

    Times are ``time.monotonic()`` seconds from ``arrival`` (when the server took the request): ttft
    runs to the first output that carries tokens; an inter-token gap is the time between two such
    outputs as the server receives them.
    """

    def __init__(
        self,
        observer: RequestObserver,
        requests: Sequence[GenerationRequest],
        n: int = 1,
        arrival: float | None = None,
    ) -> None:
        self._observer = observer
        self._method = requests[0].method.method.value
        self._requests = tuple(requests)
        self._n = n
        self._usages: dict[int, Usage] = {}
        self._start = time.monotonic() if arrival is None else arrival
        self._first: float | None = None
        self._last: float | None = None
        self._gaps: list[float] = []
        self._completion_tokens = 0
        self._queue_s: float | None = None
        self._done = False

    def on_output(self, choice: ChoiceOutput) -> None:
        out = choice.output
        now = time.monotonic()
        if out.token_ids:
            if self._last is None:
                self._first = now
            else:
                self._gaps.append(now - self._last)
            self._last = now
            self._completion_tokens += len(out.token_ids)
        if out.usage is not None:
            self._usages[choice.index] = out.usage
        if out.timings is not None:
            self._queue_s = out.timings.queue_s

    def usage(self) -> Usage:
        """The usage of the whole request: per prompt, its prompt counted once and its choices' completions
        summed (``Usage.of_choices``), then summed over the prompts. A choice the engine sent no usage for
        (it failed early) counts its prompt and no completion tokens."""
        per_prompt = []
        for p, request in enumerate(self._requests):
            extra = sum(len(ids) for ids in request.contexts[1:])
            fallback = Usage(len(request.prompt_ids), 0, base_prompt_tokens=extra, num_contexts=len(request.contexts))
            choices = [self._usages.get(p * self._n + j, fallback) for j in range(self._n)]
            per_prompt.append(Usage.of_choices(choices))
        if not self._usages:  # nothing final from the engine: count what streamed
            first = per_prompt[0]
            per_prompt[0] = Usage(first.prompt_tokens, self._completion_tokens, first.base_prompt_tokens, 0, first.num_contexts)
        return Usage(
            prompt_tokens=sum(u.prompt_tokens for u in per_prompt),
            completion_tokens=sum(u.completion_tokens for u in per_prompt),
            base_prompt_tokens=sum(u.base_prompt_tokens for u in per_prompt),
            cached_prompt_tokens=sum(u.cached_prompt_tokens for u in per_prompt),
            num_contexts=per_prompt[0].num_contexts,
        )

    def cancel(self) -> None:
        """Never report this request (it was refused before it started)."""
        self._done = True

    def finish(self, reason: str) -> None:
        """Report the request with this finish reason; later calls do nothing."""
        if self._done:
            return
        self._done = True
        usage = self.usage()
        record = RequestRecord(
            method=self._method,
            finish_reason=reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            e2e_s=time.monotonic() - self._start,
            ttft_s=None if self._first is None else self._first - self._start,
            queue_s=self._queue_s,
            inter_token_s=tuple(self._gaps),
            contexts=len(self._requests[0].contexts),
        )
        try:
            self._observer.request_finished(record)
        except Exception:  # an observer must never break a request
            logger.exception("Request observer failed")


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next(outputs: AsyncIterator[ChoiceOutput]) -> Any:
    # A task cannot carry StopAsyncIteration well; turn the end into a sentinel.
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return _END


async def _close(outputs: Any) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("Closing the engine's output stream failed")


async def iterate_until_disconnect(
    outputs: AsyncIterator[ChoiceOutput], raw_request: Request, tracker: RequestTracker
) -> AsyncGenerator[ChoiceOutput, None]:
    """The choices' outputs (``generate_choices``) to the end; raises ClientDisconnected as soon as the
    client leaves. However it ends (done, disconnect, cancellation, error), ``outputs`` is closed, which
    aborts every choice in the engine and frees its KV."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            if watcher.done():
                raise ClientDisconnected
            step = asyncio.ensure_future(_next(outputs))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise ClientDisconnected
            out = step.result()
            if out is _END:
                return
            tracker.on_output(out)
            yield out
    finally:
        watcher.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})  # let the engine's __anext__ unwind before closing the iterator
        await _close(outputs)
