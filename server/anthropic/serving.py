"""``POST /v1/messages`` over the chat endpoint: the request converted (:mod:`.conversion`), prepared and admitted by
:meth:`OpenAIServingChat.prepare <server.serving_chat.OpenAIServingChat.prepare>`, generated with
``generate_choices``, then answered whole (:mod:`.answers`) or streamed (:mod:`.events`) through
:mod:`server.serving_choices`, as chat answers are.

``POST /v1/messages/count_tokens`` is the same preparation, without the engine: the prompt's tokens.

With ``--reasoning-parser``, the model's thinking is the answer's first block (``thinking``), and tool calls are read
from the text after it. Knows nothing of routes or middleware; an error the chat's preparation raises names the
Messages request's field.
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import generate_choices
from amulet_core.errors import InvalidParameterError
from server.anthropic.answers import StopSequences, message_of, split_content, stop_reason
from server.anthropic.conversion import ChatConversion, to_chat, unknown_nested_fields
from server.anthropic.events import MessageEvents, anthropic_stream
from server.anthropic.protocol import CountTokensRequest, MessagesBody, MessagesRequest
from server.auth import tenant_of
from server.reasoning_parsers import ReasoningSplit
from server.requests.chat import PreparedChat
from server.serving_chat import OpenAIServingChat, preference_echo
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, stream_response
from server.serving_engine import RequestTracker


class AnthropicServingMessages:
    """The Messages API over the app's chat endpoint (its engine, admission, tool parser and preparation pool)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def _prepare(self, body: MessagesBody, raw_request: Request) -> tuple[ChatConversion, PreparedChat]:
        """The request converted, prepared and admitted as the chat request it stands for (errors name its fields)."""
        if body.thinking is not None and body.thinking.type == "enabled" and self.chat.config.reasoning_parser is None:
            raise InvalidParameterError(
                "thinking",
                "'thinking' of type 'enabled' is not supported: this server writes no thinking blocks "
                "(start it with --reasoning-parser for a reasoning model).",
            )
        conversion = to_chat(body)
        unknown = self.chat.admission.unknown_fields
        if unknown is not None:
            for path in unknown_nested_fields(body):
                unknown.note(path)
        try:
            return conversion, await self.chat.prepare(conversion.body, tenant_of(raw_request.scope))
        except InvalidParameterError as exc:
            conversion.names.rename(exc)
            raise

    async def count_tokens(self, body: CountTokensRequest, raw_request: Request) -> dict[str, int]:
        """``{"input_tokens": N}``: the prompt tokens of the context the model would decode (the preference context
        of a request with a preference), as rendered and encoded for ``/v1/messages``: the prompt an answer's
        ``usage`` counts (its ``input_tokens`` plus its ``cache_read_input_tokens``). Nothing is generated."""
        _, prepared = await self._prepare(body, raw_request)
        return {"input_tokens": len(prepared.request.prompt_ids)}

    async def create(self, body: MessagesRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        conversion, prepared = await self._prepare(body, raw_request)
        request = prepared.request
        renderer = self.chat.renderer()
        skip_special = request.sampling.skip_special_tokens
        stops = StopSequences(request.sampling.stop, lambda ids: renderer.decode(ids, skip_special_tokens=skip_special))
        preference = preference_echo(prepared)
        reasoning = self.chat.reasoning_parser(prepared)
        tracker = RequestTracker(self.chat.observer, [request], 1, arrival)
        outputs = generate_choices(self.chat.engine, [request], 1)
        try:  # the engine may refuse the input too (a grammar llguidance cannot compile, or runs past its limits)
            if body.stream:
                events = MessageEvents(prepared, self.chat.model_name, stops, preference, reasoning)
                retry_after_s = self.chat.config.retry_after_s
                return anthropic_stream(await stream_response(outputs, 1, events, True, raw_request, tracker, retry_after_s))
            results = await run_to_end(outputs, 1, raw_request, tracker)
        except InvalidParameterError as exc:
            conversion.names.rename(exc)
            raise
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        result = results[0]
        split = reasoning.split(result.text) if reasoning is not None else ReasoningSplit(None, result.text)
        text, calls = split_content(split.content or "", prepared.tools)
        matched = stops.matched(result.finish_reason, result.text, result.token_ids)
        reason = stop_reason(result.finish_reason, matched, bool(calls))
        usage = tracker.usage()
        message = message_of(
            request.request_id, self.chat.model_name, text, calls, reason, matched, usage, preference, split.reasoning
        )
        return JSONResponse(message.payload())
