"""Chat completions over an EngineClient: request -> GenerationRequest, then a JSON or SSE answer.

Knows nothing of routes or middleware (see app.py) and nothing of the real engine: it only uses
the EngineClient protocol, so tests run it over a fake engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import EngineClient, GenerationRequest, Usage
from amulet_core.errors import EngineNotReadyError, InvalidParameterError
from amulet_core.method.preference_prompts import TEMPLATE, resolve_default_system_prompt
from amulet_core.method.settings import Method, MethodSettings
from server.config import ServerConfig
from server.generation_fields import check_choices, check_model, renamed_param, sampling_params, template_options
from server.observer import RequestObserver
from server.preference_request import plan_contexts, preference_plan
from server.protocol import ChatCompletionRequest
from server.protocol_answers import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    PreferenceEcho,
    UsageInfo,
)
from server.request_policy import UnknownFieldLog, apply_request_policy
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, sse, stream_response
from server.serving_engine import OpenAIServing, RequestTracker
from server.serving_tools import (
    ToolCallStream,
    ToolRequest,
    tool_calls_out,
    tool_request,
    with_tools_described,
    without_tool_roles,
)
from server.structured_request import requested_grammar
from server.tool_parsers import ToolParser, auto_tool_parser, get_tool_parser

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    body: ChatCompletionRequest
    request: GenerationRequest
    preference: PreferenceEcho | None
    tools: ToolRequest | None = None


def check_chat_fields(body: ChatCompletionRequest) -> None:
    """Rules between chat fields that their types do not express."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidParameterError("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")


class OpenAIServingChat(OpenAIServing):
    """``POST /v1/chat/completions`` over any EngineClient."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        config: ServerConfig,
        observer: RequestObserver,
        unknown_fields: UnknownFieldLog,
    ) -> None:
        super().__init__(engine, model_name, config, observer, unknown_fields)
        self._tool_parser: ToolParser | None = None
        self._told_tools_described = False

    def tool_parser(self) -> ToolParser:
        """The configured tool-call parser; ``auto`` picks one from the chat template, once, and logs which."""
        if self._tool_parser is None:
            name = self.config.tool_call_parser
            if name == "auto":
                name = auto_tool_parser(self.engine.chat_template_text())
                logger.info("Tool calls are parsed as '%s' (picked from the chat template; see --tool-call-parser).", name)
            self._tool_parser = get_tool_parser(name)
        return self._tool_parser

    def _conversation_with_tools(
        self, messages: list[dict[str, Any]], tools: ToolRequest | None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The history as the template can render it, and whether the template renders tools itself."""
        has_tool_roles = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if tools is None and not has_tool_roles:
            return messages, True
        if self.engine.template_renders_tools():
            return messages, True
        if tools is not None and not self._told_tools_described:
            self._told_tools_described = True
            logger.warning("The chat template does not render tools: they are described in the system message (Hermes format).")
        return without_tool_roles(messages), False

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
        choices = []
        for r in results:
            message, reason = AssistantMessage(content=r.text), r.finish_reason or "stop"
            if prepared.tools is not None:
                parsed = prepared.tools.parse(r.text)
                calls = tool_calls_out(parsed)
                message = AssistantMessage(content=parsed.content, tool_calls=calls or None)
                reason = "tool_calls" if calls and reason == "stop" else reason
            logprobs = ChoiceLogprobs.from_engine(r.logprobs) if want_logprobs else None
            choices.append(ChatChoice(index=r.index, message=message, logprobs=logprobs, finish_reason=reason))
        response = ChatCompletionResponse(
            id=prepared.request.request_id,
            model=self.model_name,
            choices=choices,
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
        tools = tool_request(body, self.tool_parser)
        grammar = requested_grammar(body)
        if tools is not None and tools.choice != "auto":
            if grammar is not None:
                raise InvalidParameterError(grammar.param, f"'{grammar.param}' cannot be combined with a forced 'tool_choice'.")
            grammar = tools.grammar()
        messages, renders_tools = self._conversation_with_tools([m.for_template() for m in body.messages], tools)
        options = template_options(
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
            tools.openai_tools if tools is not None and renders_tools else (),
        )
        options.check(messages)
        preference: PreferenceEcho | None = None
        plan = preference_plan(body, self.config.max_preferences)
        if plan is None:
            settings, contexts = MethodSettings(method=Method.BASE), [messages]
        else:
            default_system = resolve_default_system_prompt(
                self.config.default_system_prompt, self.engine.template_system_prompt()
            )
            settings = plan.settings
            contexts, preference = plan_contexts(plan, messages, default_system)
        if tools is not None and not renders_tools:
            template_default = resolve_default_system_prompt(TEMPLATE, self.engine.template_system_prompt())
            contexts = [with_tools_described(c, tools.tools, template_default) for c in contexts]
        # Chat templates and tokenizers take a while on long prompts: keep them off the event loop.
        ids = await asyncio.to_thread(lambda: [tuple(self.engine.encode_chat(c, options)) for c in contexts])
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sampling = sampling_params(
            body,
            max_tokens=body.requested_max_tokens,
            max_tokens_param=param,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            grammar=grammar,
        )
        request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt_ids=ids[0],
            sampling=sampling,
            method=settings,
            extra_prompt_ids=tuple(ids[1 : settings.num_preferences]) if settings.method is not Method.BASE else (),
            contrast_prompt_ids=ids[-1] if settings.method in (Method.AMULET, Method.LA) else None,
        )
        renamed_param("max_tokens", param, lambda: request.max_new_tokens(self.engine.max_model_len))
        return PreparedChat(body=body, request=request, preference=preference, tools=tools)


class ChatChunks:
    """``chat.completion.chunk`` events (a ChunkFormat): each choice opens with its role and the preference
    echo, then text deltas, then its finish (with the echo again); usage comes last when asked for."""

    def __init__(self, prepared: PreparedChat, model_name: str) -> None:
        self.prepared = prepared
        self.model_name = model_name
        self.created = int(time.time())
        self.want_logprobs = prepared.request.sampling.logprobs
        self.include_usage = prepared.body.include_usage
        tools = prepared.tools
        self.tool_streams = [ToolCallStream(tools) for _ in range(prepared.body.num_choices)] if tools else []

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
            choice_payload["delta"] = _without_nulls(choice_payload["delta"])
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

    def delta(self, choice: ChoiceOutput) -> list[str]:
        out = choice.output
        text = self.tool_streams[choice.index].feed(out.text) if self.tool_streams else out.text
        if not (text or (self.want_logprobs and out.logprobs)):
            return []
        lps = ChoiceLogprobs.from_engine(list(out.logprobs)) if self.want_logprobs and out.logprobs else None
        return [self._chunk(ChunkChoice(index=choice.index, delta=DeltaMessage(content=text), logprobs=lps))]

    def finish(self, index: int, reason: str) -> list[str]:
        events = []
        if self.tool_streams:
            content, calls = self.tool_streams[index].finish()
            if content:
                events.append(self._chunk(ChunkChoice(index=index, delta=DeltaMessage(content=content))))
            for call in calls:
                events.append(self._chunk(ChunkChoice(index=index, delta=DeltaMessage(tool_calls=[call]))))
            reason = "tool_calls" if calls and reason == "stop" else reason
        final = ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)
        return [*events, self._chunk(final, self.prepared.preference)]

    def usage(self, usage: Usage) -> str:
        return self._chunk(None, usage=UsageInfo.from_engine(usage))


def _without_nulls(value: Any) -> Any:
    """A chunk's delta with its unset fields left out, as OpenAI sends it (also inside ``tool_calls``)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
