"""``POST /v1/messages`` over the chat endpoint: the request converted (:mod:`.conversion`), prepared and admitted by
:meth:`OpenAIServingChat.prepare <server.serving_chat.OpenAIServingChat.prepare>`, generated with
``generate_choices``, then answered whole (:mod:`.answers`) or streamed (:mod:`.events`) through
:mod:`server.serving_choices`, as chat answers are.

Knows nothing of routes or middleware; an error the chat's preparation raises names the Messages request's field.
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import generate_choices
from amulet_core.errors import InvalidParameterError
from server.anthropic.answers import StopSequences, message_of, split_content, stop_reason
from server.anthropic.conversion import to_chat, unknown_nested_fields
from server.anthropic.events import MessageEvents, anthropic_stream
from server.anthropic.protocol import MessagesRequest
from server.auth import tenant_of
from server.serving_chat import OpenAIServingChat, preference_echo
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, stream_response
from server.serving_engine import RequestTracker


class AnthropicServingMessages:
    """The Messages API over the app's chat endpoint (its engine, admission, tool parser and preparation pool)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create(self, body: MessagesRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        conversion = to_chat(body)
        unknown = self.chat.admission.unknown_fields
        if unknown is not None:
            for path in unknown_nested_fields(body):
                unknown.note(path)
        try:
            prepared = await self.chat.prepare(conversion.body, tenant_of(raw_request.scope))
        except InvalidParameterError as exc:
            conversion.names.rename(exc)
            raise
        request = prepared.request
        renderer = self.chat.renderer()
        skip_special = request.sampling.skip_special_tokens
        stops = StopSequences(request.sampling.stop, lambda ids: renderer.decode(ids, skip_special_tokens=skip_special))
        preference = preference_echo(prepared)
        tracker = RequestTracker(self.chat.observer, [request], 1, arrival)
        outputs = generate_choices(self.chat.engine, [request], 1)
        try:  # the engine may refuse the input too (a grammar llguidance cannot compile, or runs past its limits)
            if body.stream:
                events = MessageEvents(prepared, self.chat.model_name, stops, preference)
                retry_after_s = self.chat.config.retry_after_s
                return anthropic_stream(await stream_response(outputs, 1, events, True, raw_request, tracker, retry_after_s))
            results = await run_to_end(outputs, 1, raw_request, tracker)
        except InvalidParameterError as exc:
            conversion.names.rename(exc)
            raise
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        result = results[0]
        text, calls = split_content(result.text, prepared.tools)
        matched = stops.matched(result.finish_reason, result.text, result.token_ids)
        reason = stop_reason(result.finish_reason, matched, bool(calls))
        message = message_of(request.request_id, self.chat.model_name, text, calls, reason, matched, tracker.usage(), preference)
        return JSONResponse(message.payload())
