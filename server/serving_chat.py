"""Chat completions over an EngineClient: request -> GenerationRequest, then a JSON or SSE answer.

Knows nothing of routes or middleware (see app.py) and nothing of the real engine: it only uses
the EngineClient protocol, so tests run it over a fake engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from amulet_core.engine.protocol import EngineClient, GenerationOutput, GenerationRequest, TokenLogprob
from amulet_core.errors import (
    AmuletError,
    EngineNotReadyError,
    EngineOverloadedError,
    InvalidParameterError,
    RequestFailedError,
)
from amulet_core.methods import Method, MethodSettings, Mode
from amulet_core.prompts import preference_message_pair, preference_sentence, resolve_default_system_prompt
from amulet_core.sampling_params import SamplingParams
from server.config import ServerConfig
from server.errors import APIError, describe_exception, error_payload
from server.observer import RequestObserver
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    PreferenceEcho,
    PreferenceSpec,
    UsageInfo,
)
from server.serving_engine import ClientDisconnected, RequestTracker, iterate_until_disconnect

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""Status logged for an answer nobody is left to read (the client went away)."""

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    body: ChatCompletionRequest
    request: GenerationRequest
    preference: PreferenceEcho | None


def check_supported(body: ChatCompletionRequest) -> None:
    """Parameters that parse but that this server does not do (400 rather than silently ignored)."""
    if body.n is not None and body.n != 1:
        raise InvalidParameterError("n", f"Only n=1 is supported (one choice per request), got n={body.n}.")
    if body.stream_options is not None and not body.stream:
        raise InvalidParameterError("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    if body.top_logprobs and not body.logprobs:
        raise InvalidParameterError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise InvalidParameterError(name, f"'{name}' is not supported (only 0).")


def method_settings(preference: str | PreferenceSpec) -> tuple[str, MethodSettings]:
    """The preference text and its MethodSettings (the defaults for whatever is not given)."""
    if isinstance(preference, str):
        return preference, MethodSettings()
    try:
        return preference.text, MethodSettings.from_fields(preference.method_fields(), preference.mode or Mode.DEFAULT)
    except InvalidParameterError as exc:
        param = {"lam": "lambda", "strength": "coefficient"}.get(exc.param, exc.param)
        raise InvalidParameterError(f"preference.{param}", exc.message) from exc


def _renamed_param(name: str, alias: str, make: Callable[[], T]) -> T:
    """Run ``make``; an InvalidParameterError about ``name`` is reported under the request's field ``alias``."""
    try:
        return make()
    except InvalidParameterError as exc:
        if exc.param != name or alias == name:
            raise
        exc.param = alias
        exc.message = exc.message.replace(f"'{name}'", f"'{alias}'")
        exc.args = (exc.message,)
        raise


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class OpenAIServingChat:
    """``POST /v1/chat/completions`` over any EngineClient."""

    def __init__(self, engine: EngineClient, model_name: str, config: ServerConfig, observer: RequestObserver) -> None:
        self.engine = engine
        self.model_name = model_name
        self.config = config
        self.observer = observer

    async def create(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        prepared = await self.prepare(body)
        tracker = RequestTracker(self.observer, prepared.request, arrival)
        if body.stream:
            return await self._stream(prepared, raw_request, tracker)
        return await self._complete(prepared, raw_request, tracker)

    # ------------------------------------------------------------ request -> GenerationRequest

    async def prepare(self, body: ChatCompletionRequest) -> PreparedChat:
        if body.model and body.model != self.model_name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )
        check_supported(body)
        if not self.engine.ready:
            raise EngineNotReadyError("The model is still loading; retry later.")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        preference: PreferenceEcho | None = None
        if body.preference is None:
            settings, contexts = MethodSettings(method=Method.BASE), [messages]
        else:
            text, settings = method_settings(body.preference)
            default_system = resolve_default_system_prompt(
                self.config.default_system_prompt, self.engine.template_system_prompt()
            )
            pair = preference_message_pair(messages, text, default_system)
            preference = PreferenceEcho.from_settings(preference_sentence(text), pair.system_prompt, settings)
            contexts = {Method.BASE: [pair.base], Method.PREF: [pair.pref]}.get(settings.method, [pair.pref, pair.base])
        # Chat templates and tokenizers take a while on long prompts: keep them off the event loop.
        ids = await asyncio.to_thread(lambda: [tuple(self.engine.encode_chat(c)) for c in contexts])
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sampling = _renamed_param(
            "max_tokens",
            param,
            lambda: SamplingParams(
                max_tokens=body.requested_max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None or body.top_k == -1 else body.top_k,  # -1 means off in vLLM
                seed=body.seed,
                stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
                logprobs=bool(body.logprobs),
                top_logprobs=body.top_logprobs or 0,
            ),
        )
        request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_ids=ids[0],
            sampling=sampling,
            method=settings,
            base_prompt_ids=ids[1] if len(ids) == 2 else None,
        )
        _renamed_param("max_tokens", param, lambda: request.max_new_tokens(self.engine.max_model_len))
        return PreparedChat(body=body, request=request, preference=preference)

    # ------------------------------------------------------------ answers

    async def _complete(self, prepared: PreparedChat, raw_request: Request, tracker: RequestTracker) -> Response:
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        final: GenerationOutput | None = None
        try:
            async with aclosing(iterate_until_disconnect(self.engine, prepared.request, raw_request, tracker)) as outs:
                async for out in outs:
                    texts.append(out.text)
                    logprobs.extend(out.logprobs or ())
                    final = out
        except BaseException as exc:
            if settle(tracker, exc):
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            raise
        reason = final.finish_reason if final else None
        if reason not in ("stop", "length"):
            tracker.finish("abort" if reason == "abort" else "error")
            raise unfinished(final)
        tracker.finish(reason)
        response = ChatCompletionResponse(
            id=prepared.request.request_id,
            model=self.model_name,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content="".join(texts)),
                    logprobs=ChoiceLogprobs.from_engine(logprobs) if prepared.request.sampling.logprobs else None,
                    finish_reason=reason,
                )
            ],
            usage=UsageInfo.from_engine(tracker.usage()),
            preference=prepared.preference,
        )
        return JSONResponse(response.model_dump(by_alias=True))

    async def _stream(self, prepared: PreparedChat, raw_request: Request, tracker: RequestTracker) -> Response:
        outputs = iterate_until_disconnect(self.engine, prepared.request, raw_request, tracker)
        # Wait for the first output before answering, so that a full queue or an unloaded model still
        # gets its HTTP status (429, 503): once a 200 stream has begun, only an error event is possible.
        try:
            first = await anext(outputs, None)
        except BaseException as exc:
            await outputs.aclose()
            if settle(tracker, exc):
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            raise
        return StreamingResponse(
            self._events(prepared, first, outputs, tracker), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _events(
        self,
        prepared: PreparedChat,
        first: GenerationOutput | None,
        outputs: AsyncGenerator[GenerationOutput, None],
        tracker: RequestTracker,
    ) -> AsyncIterator[str]:
        request_id, created = prepared.request.request_id, int(time.time())
        include_usage, want_logprobs = prepared.body.include_usage, prepared.request.sampling.logprobs

        def chunk(choice: ChunkChoice | None, preference: PreferenceEcho | None = None, usage: UsageInfo | None = None) -> str:
            payload = ChatCompletionChunk(
                id=request_id,
                created=created,
                model=self.model_name,
                choices=[choice] if choice else [],
                usage=usage,
                preference=preference,
            ).model_dump(by_alias=True)
            for choice_payload in payload["choices"]:  # OpenAI sends only the delta's set fields
                choice_payload["delta"] = {k: v for k, v in choice_payload["delta"].items() if v is not None}
            if preference is None:
                del payload["preference"]
            if not include_usage:
                del payload["usage"]
            return sse(payload)

        gone = False
        try:
            yield chunk(ChunkChoice(delta=DeltaMessage(role="assistant", content="")), prepared.preference)
            final = None
            async for out in _prepend(first, outputs):
                final = out
                if out.text or (want_logprobs and out.logprobs):
                    lps = ChoiceLogprobs.from_engine(list(out.logprobs)) if want_logprobs and out.logprobs else None
                    yield chunk(ChunkChoice(delta=DeltaMessage(content=out.text), logprobs=lps))
            reason = final.finish_reason if final else None
            if reason in ("stop", "length"):
                tracker.finish(reason)
                yield chunk(ChunkChoice(delta=DeltaMessage(), finish_reason=reason), prepared.preference)
                if include_usage:
                    yield chunk(None, usage=UsageInfo.from_engine(tracker.usage()))
            else:
                tracker.finish("abort" if reason == "abort" else "error")
                yield sse(error_payload(describe_exception(unfinished(final)).info))
        except ClientDisconnected:
            tracker.finish("abort")
            gone = True  # nobody is left to read anything
        except (asyncio.CancelledError, GeneratorExit):
            tracker.finish("abort")
            raise
        except Exception as exc:
            tracker.finish("error")
            if not isinstance(exc, AmuletError):
                logger.exception("Stream %s failed", request_id)
            yield sse(error_payload(describe_exception(exc, self.config.retry_after_s).info))
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


def unfinished(final: GenerationOutput | None) -> Exception:
    """The error for a generation that ended without stop/length."""
    if final is not None and final.finish_reason == "abort":
        return EngineNotReadyError("The request was aborted: the server is shutting down.")
    return RequestFailedError(final.error if final is not None and final.error else "The generation failed.")


async def _prepend(first: GenerationOutput | None, rest: AsyncIterator[GenerationOutput]) -> AsyncIterator[GenerationOutput]:
    if first is None:  # the engine ended without any output
        return
    yield first
    async for out in rest:
        yield out
