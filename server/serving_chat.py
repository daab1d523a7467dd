"""Chat completions over an EngineClient: request -> GenerationRequest, then a JSON or SSE answer.

Knows nothing of routes or middleware (see app.py) and nothing of the real engine: it only uses
the EngineClient protocol, so tests run it over a fake engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import EngineClient, GenerationRequest, Usage
from amulet_core.errors import EngineNotReadyError, InvalidParameterError
from amulet_core.methods import Method, MethodSettings
from amulet_core.prompts import ChatTemplateOptions, preference_message_pair, preference_sentence, resolve_default_system_prompt
from server.config import ServerConfig
from server.generation_fields import check_choices, check_model, method_settings, renamed_param, sampling_params
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
    UsageInfo,
)
from server.request_policy import UnknownFieldLog, apply_request_policy
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, sse, stream_response
from server.serving_engine import RequestTracker


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    body: ChatCompletionRequest
    request: GenerationRequest
    preference: PreferenceEcho | None


def check_chat_fields(body: ChatCompletionRequest) -> None:
    """Rules between chat fields that their types do not express."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidParameterError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")


def template_options(body: ChatCompletionRequest) -> ChatTemplateOptions:
    """How the request's conversation is rendered (vLLM's ``add_generation_prompt``, ``continue_final_message``,
    ``chat_template_kwargs``)."""
    continue_final = bool(body.continue_final_message)
    add_prompt = (not continue_final) if body.add_generation_prompt is None else body.add_generation_prompt
    return ChatTemplateOptions(
        add_generation_prompt=add_prompt,
        continue_final_message=continue_final,
        template_kwargs=tuple((body.chat_template_kwargs or {}).items()),
    )


class OpenAIServingChat:
    """``POST /v1/chat/completions`` over any EngineClient."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        config: ServerConfig,
        observer: RequestObserver,
        unknown_fields: UnknownFieldLog,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.config = config
        self.observer = observer
        self.unknown_fields = unknown_fields

    async def create(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        prepared = await self.prepare(body)
        n = body.num_choices
        tracker = RequestTracker(self.observer, [prepared.request], n, arrival)
        outputs = generate_choices(self.engine, [prepared.request], n)
        if body.stream:
            chunks = ChatChunks(prepared, self.model_name)
            return await stream_response(outputs, n, chunks, body.include_usage, raw_request, tracker, self.config.retry_after_s)
        results = await run_to_end(outputs, n, raw_request, tracker)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        want_logprobs = prepared.request.sampling.logprobs
        response = ChatCompletionResponse(
            id=prepared.request.request_id,
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=r.index,
                    message=AssistantMessage(content=r.text),
                    logprobs=ChoiceLogprobs.from_engine(r.logprobs) if want_logprobs else None,
                    finish_reason=r.finish_reason or "stop",
                )
                for r in results
            ],
            usage=UsageInfo.from_engine(tracker.usage()),
            preference=prepared.preference,
        )
        return JSONResponse(response.model_dump(by_alias=True))

    # ------------------------------------------------------------ request -> GenerationRequest

    async def prepare(self, body: ChatCompletionRequest) -> PreparedChat:
        check_model(body.model, self.model_name)
        apply_request_policy(body, self.unknown_fields)
        check_choices(body, self.config.max_n)
        check_chat_fields(body)
        if not self.engine.ready:
            raise EngineNotReadyError("The model is still loading; retry later.")
        messages = [m.for_template() for m in body.messages]
        options = template_options(body)
        options.check(messages)
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
        ids = await asyncio.to_thread(lambda: [tuple(self.engine.encode_chat(c, options)) for c in contexts])
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sampling = sampling_params(
            body,
            max_tokens=body.requested_max_tokens,
            max_tokens_param=param,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
        )
        request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_ids=ids[0],
            sampling=sampling,
            method=settings,
            base_prompt_ids=ids[1] if len(ids) == 2 else None,
        )
        renamed_param("max_tokens", param, lambda: request.max_new_tokens(self.engine.max_model_len))
        return PreparedChat(body=body, request=request, preference=preference)


class ChatChunks:
    """``chat.completion.chunk`` events (a ChunkFormat): each choice opens with its role and the preference
    echo, then text deltas, then its finish (with the echo again); usage comes last when asked for."""

    def __init__(self, prepared: PreparedChat, model_name: str) -> None:
        self.prepared = prepared
        self.model_name = model_name
        self.created = int(time.time())
        self.want_logprobs = prepared.request.sampling.logprobs
        self.include_usage = prepared.body.include_usage

    def _chunk(self, choice: ChunkChoice | None, preference: PreferenceEcho | None = None, usage: UsageInfo | None = None) -> str:
        payload: dict[str, Any] = ChatCompletionChunk(
            id=self.prepared.request.request_id,
            created=self.created,
            model=self.model_name,
            choices=[choice] if choice else [],
            usage=usage,
            preference=preference,
        ).model_dump(by_alias=True)
        for choice_payload in payload["choices"]:  # OpenAI sends only the delta's set fields
            choice_payload["delta"] = {k: v for k, v in choice_payload["delta"].items() if v is not None}
        if preference is None:
            del payload["preference"]
        if not self.include_usage:
            del payload["usage"]
        return sse(payload)

    def opening(self, num_choices: int) -> list[str]:
        return [
            self._chunk(ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")), self.prepared.preference)
            for i in range(num_choices)
        ]

    def delta(self, choice: ChoiceOutput) -> str | None:
        out = choice.output
        if not (out.text or (self.want_logprobs and out.logprobs)):
            return None
        lps = ChoiceLogprobs.from_engine(list(out.logprobs)) if self.want_logprobs and out.logprobs else None
        return self._chunk(ChunkChoice(index=choice.index, delta=DeltaMessage(content=out.text), logprobs=lps))

    def finish(self, index: int, reason: str) -> str:
        return self._chunk(ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason), self.prepared.preference)

    def usage(self, usage: Usage) -> str:
        return self._chunk(None, usage=UsageInfo.from_engine(usage))
