"""Chat completions over an EngineClient: the prepared request (:mod:`server.requests.chat`) to the engine,
then a JSON or SSE answer.

Knows nothing of routes or middleware (see app.py) and nothing of the real engine: it only uses
the EngineClient protocol, so tests run it over a fake engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import EngineClient, Usage
from server.auth import tenant_of
from server.config import ServerConfig
from server.observer import RequestObserver
from server.profiles.service import PreferenceProfiles
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
from server.reasoning_parsers import ReasoningParser, ReasoningSplit
from server.requests.chat import PreparedChat
from server.requests.chat import prepare as prepare_chat
from server.requests.policy import UnknownFieldLog
from server.requests.preparation import PreparationPool
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, sse, stream_response
from server.serving_engine import OpenAIServing, RequestTracker
from server.tool_calls import ToolCallStream, tool_calls_out

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    """``POST /v1/chat/completions`` over any EngineClient: :func:`server.requests.chat.prepare`, the engine,
    then a JSON or SSE answer."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        config: ServerConfig,
        observer: RequestObserver,
        unknown_fields: UnknownFieldLog,
        *,
        preparation: PreparationPool | None = None,
        profiles: PreferenceProfiles | None = None,
    ) -> None:
        super().__init__(engine, model_name, config, observer, unknown_fields, preparation=preparation, profiles=profiles)
        self._told_tools_described = False

    async def prepare(self, body: ChatCompletionRequest, tenant: str | None = None) -> PreparedChat:
        body = await self.resolve_profile(body, tenant)
        prepared = await prepare_chat(body, self.renderer, self.admission, tenant)
        if prepared.rendered.tools_described and not self._told_tools_described:
            self._told_tools_described = True
            logger.warning("The chat template does not render tools: they are described in the system message (Hermes format).")
        return prepared

    def reasoning_parser(self, prepared: PreparedChat) -> ReasoningParser | None:
        """How the answers to ``prepared`` split into thinking and answer (None: ``--reasoning-parser`` unset)."""
        if self.config.reasoning_parser is None:
            return None
        return ReasoningParser.for_prompt(prepared.rendered.texts[0])

    async def create(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        prepared = await self.prepare(body, tenant_of(raw_request.scope))
        n = body.num_choices
        tracker = RequestTracker(self.observer, [prepared.request], n, arrival)
        outputs = generate_choices(self.engine, [prepared.request], n)
        if body.stream:
            chunks = ChatChunks(prepared, self.model_name, self.reasoning_parser(prepared))
            return await stream_response(outputs, n, chunks, body.include_usage, raw_request, tracker, self.config.retry_after_s)
        results = await run_to_end(outputs, n, raw_request, tracker)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        want_logprobs = prepared.request.sampling.logprobs
        reasoning = self.reasoning_parser(prepared)
        choices = []
        for r in results:
            split = reasoning.split(r.text) if reasoning is not None else ReasoningSplit(None, r.text)
            message, reason = (
                AssistantMessage(content=split.content, reasoning_content=split.reasoning),
                r.finish_reason or "stop",
            )
            if prepared.tools is not None and (split.content is not None or reasoning is None):
                parsed = prepared.tools.parse(split.content or "")
                calls = tool_calls_out(parsed)
                message = AssistantMessage(content=parsed.content, reasoning_content=split.reasoning, tool_calls=calls or None)
                reason = "tool_calls" if calls and reason == "stop" else reason
            logprobs = ChoiceLogprobs.from_engine(r.logprobs) if want_logprobs else None
            choices.append(ChatChoice(index=r.index, message=message, logprobs=logprobs, finish_reason=reason))
        response = ChatCompletionResponse(
            id=prepared.request.request_id,
            model=self.model_name,
            choices=choices,
            usage=UsageInfo.from_engine(tracker.usage()),
            preference=preference_echo(prepared),
        )
        return JSONResponse(response.model_dump(by_alias=True))


def preference_echo(prepared: PreparedChat) -> PreferenceEcho | None:
    """The answer's ``preference``: the effective settings and sentences; None for a plain request."""
    plan, built = prepared.intent.plan, prepared.rendered.contexts
    if plan is None or built is None:
        return None
    return PreferenceEcho.from_settings(
        built.sentences, built.system_prompt, plan.settings, built.negative, plan.mode, placement=plan.placement.value
    )


class ChatChunks:
    """``chat.completion.chunk`` events (a ChunkFormat): each choice opens with its role and the preference
    echo, then text deltas, then its finish (with the echo again); usage comes last when asked for."""

    def __init__(self, prepared: PreparedChat, model_name: str, reasoning: ReasoningParser | None = None) -> None:
        self.prepared = prepared
        self.preference = preference_echo(prepared)
        self.model_name = model_name
        self.created = int(time.time())
        self.want_logprobs = prepared.request.sampling.logprobs
        self.include_usage = prepared.body.include_usage
        tools = prepared.tools
        self.tool_streams = [ToolCallStream(tools) for _ in range(prepared.body.num_choices)] if tools else []
        n = prepared.body.num_choices
        self.reasoning_streams = [reasoning.stream() for _ in range(n)] if reasoning is not None else []

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
            self._chunk(ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")), self.preference)
            for i in range(num_choices)
        ]

    def delta(self, choice: ChoiceOutput) -> list[str]:
        out = choice.output
        split = self.reasoning_streams[choice.index].feed(out.text) if self.reasoning_streams else ReasoningSplit(None, out.text)
        lps = ChoiceLogprobs.from_engine(list(out.logprobs)) if self.want_logprobs and out.logprobs else None
        return self._split_events(choice.index, split, lps)

    def _split_events(self, index: int, split: ReasoningSplit, lps: ChoiceLogprobs | None = None) -> list[str]:
        """The chunks of a piece of thinking and answer (the log-probabilities ride on the first)."""
        events = []
        if split.reasoning:
            events.append(
                self._chunk(ChunkChoice(index=index, delta=DeltaMessage(reasoning_content=split.reasoning), logprobs=lps))
            )
            lps = None
        text = split.content or ""
        if self.tool_streams and text:
            text = self.tool_streams[index].feed(text)
        if text or lps is not None:
            events.append(self._chunk(ChunkChoice(index=index, delta=DeltaMessage(content=text), logprobs=lps)))
        return events

    def finish(self, index: int, reason: str) -> list[str]:
        events = self._split_events(index, self.reasoning_streams[index].finish()) if self.reasoning_streams else []
        if self.tool_streams:
            content, calls = self.tool_streams[index].finish()
            if content:
                events.append(self._chunk(ChunkChoice(index=index, delta=DeltaMessage(content=content))))
            for call in calls:
                events.append(self._chunk(ChunkChoice(index=index, delta=DeltaMessage(tool_calls=[call]))))
            reason = "tool_calls" if calls and reason == "stop" else reason
        final = ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)
        return [*events, self._chunk(final, self.preference)]

    def usage(self, usage: Usage) -> str:
        return self._chunk(None, usage=UsageInfo.from_engine(usage))


def _without_nulls(value: Any) -> Any:
    """A chunk's delta with its unset fields left out, as OpenAI sends it (also inside ``tool_calls``)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
