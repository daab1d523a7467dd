"""``POST /v1/responses`` and the stored responses' routes over the chat path and the response store.

A request is prepared as the chat request it maps to (:func:`~server.responses.chat_request.chat_request`,
then :meth:`OpenAIServingChat.prepare`: the same admission, preference plan, tools and grammar), decoded with one
choice, and answered as a response object or its events (with ``--reasoning-parser``, the thinking first, as a
``reasoning`` item: :mod:`server.responses.reasoning`). ``store`` (the default) keeps it, owned by the caller's
tenant, so that ``previous_response_id`` continues the conversation: the stored conversation, then the new input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.errors import InvalidParameterError
from server.auth import tenant_of
from server.errors import SERVER_ERROR, APIError
from server.request_id import request_id_of
from server.requests.chat import PreparedChat
from server.responses.answer import output_items, parsed_output, response_object, status_of
from server.responses.chat_request import chat_request, refuse_unsupported, renamed
from server.responses.events import ResponseBuilder, ResponseEvents, finished_stream
from server.responses.items import Item, input_items, new_id
from server.responses.protocol import ResponsesRequest
from server.responses.reasoning import ThinkingTokens, counting
from server.serving_chat import OpenAIServingChat, preference_echo
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, stream_response
from server.serving_engine import RequestTracker
from server.store.database import StoreError
from server.store.responses import ResponseStore, StoredResponse
from server.tool_calls import ToolCallStream

logger = logging.getLogger(__name__)

STORE_FAILED_MESSAGE = (
    "The response store failed (the server log has the details under this request id); nothing stored before is "
    "lost. Retry, or send 'store': false."
)
MAX_LISTED_ITEMS = 100


def store_failed(exc: StoreError, retry_after_s: int) -> APIError:
    return APIError(
        503, STORE_FAILED_MESSAGE, type=SERVER_ERROR, code="store_unavailable", headers={"Retry-After": str(retry_after_s)}
    )


def not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param == "previous_response_id" else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param, code="not_found")


class OpenAIServingResponses:
    """The Responses API over ``chat`` (its engine, admission and observer) and ``store``."""

    def __init__(self, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store
        self.retry_after_s = chat.config.retry_after_s

    async def _stored(self, response_id: str, owner: str | None, param: str | None = None) -> StoredResponse:
        try:
            found = await self.store.load(response_id, owner)
        except StoreError as exc:
            raise store_failed(exc, self.retry_after_s) from exc
        if found is None:
            raise not_found(response_id, param)
        return found

    async def _prepare(self, body: ResponsesRequest, conversation: list[Item], tenant: str | None) -> PreparedChat:
        try:
            return await self.chat.prepare(chat_request(body, conversation), tenant)
        except InvalidParameterError as exc:
            raise renamed(exc) from None

    async def create(self, body: ResponsesRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        refuse_unsupported(body)
        tenant = tenant_of(raw_request.scope)
        history: list[Item] = []
        if body.previous_response_id is not None:
            history = (await self._stored(body.previous_response_id, tenant, "previous_response_id")).conversation
        given = input_items(body)
        if not given:
            raise InvalidParameterError("input", "'input' must hold at least one item.")
        prepared = await self._prepare(body, history + given, tenant)
        response_id, created_at = new_id("resp"), self.store.now()
        echo = preference_echo(prepared)
        preference = echo.model_dump(by_alias=True) if echo is not None else None

        def build(**state: Any) -> dict[str, Any]:
            return response_object(
                body, response_id=response_id, created_at=created_at, model=self.chat.model_name, preference=preference, **state
            )

        async def keep(response: dict[str, Any]) -> None:
            if body.store is False:
                return
            output = response["output"]
            record = StoredResponse(response_id, tenant, created_at, response, given, history + given + output)
            await self.store.save(record)

        tracker = RequestTracker(self.chat.observer, [prepared.request], 1, arrival)
        outputs = generate_choices(self.chat.engine, [prepared.request], 1)
        if body.stream:
            return await self._stream(prepared, outputs, tracker, raw_request, build, keep)
        parser = self.chat.reasoning_parser(prepared)
        thinking = ThinkingTokens(parser) if parser is not None else None
        results = await run_to_end(counting(outputs, thinking) if thinking is not None else outputs, 1, raw_request, tracker)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        answer = parsed_output(prepared, results[0].text, parser)
        status, incomplete = status_of(results[0].finish_reason)
        reasoning_tokens = thinking.count if thinking is not None else 0
        response = build(
            status=status,
            output=output_items(answer),
            usage=tracker.usage(),
            reasoning_tokens=reasoning_tokens,
            incomplete=incomplete,
        )
        try:
            await keep(response)
        except StoreError as exc:
            raise store_failed(exc, self.retry_after_s) from exc
        return JSONResponse(response)

    async def _stream(
        self,
        prepared: PreparedChat,
        outputs: AsyncGenerator[ChoiceOutput, None],
        tracker: RequestTracker,
        raw_request: Request,
        build: ResponseBuilder,
        keep: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> Response:
        tools = ToolCallStream(prepared.tools) if prepared.tools is not None else None
        chunks = ResponseEvents(build, tools, self.chat.reasoning_parser(prepared))
        request_id = request_id_of(raw_request.scope)

        async def store(response: dict[str, Any]) -> dict[str, Any] | None:
            try:
                await keep(response)
            except StoreError:
                return {"code": "store_unavailable", "message": STORE_FAILED_MESSAGE, "param": None, "request_id": request_id}
            return None

        answer = await stream_response(outputs, 1, chunks, True, raw_request, tracker, self.retry_after_s)
        if isinstance(answer, StreamingResponse):
            answer.body_iterator = finished_stream(answer.body_iterator, chunks, store)  # type: ignore[arg-type]
        return answer

    async def retrieve(self, response_id: str, raw_request: Request) -> dict[str, Any]:
        return (await self._stored(response_id, tenant_of(raw_request.scope))).response

    async def delete(self, response_id: str, raw_request: Request) -> dict[str, Any]:
        try:
            deleted = await self.store.delete(response_id, tenant_of(raw_request.scope))
        except StoreError as exc:
            raise store_failed(exc, self.retry_after_s) from exc
        if not deleted:
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(
        self, response_id: str, raw_request: Request, *, limit: int, order: str, after: str | None, before: str | None
    ) -> dict[str, Any]:
        """A page of the response's input items (``order`` ``desc``: the newest first, as OpenAI's default)."""
        items = list((await self._stored(response_id, tenant_of(raw_request.scope))).input_items)
        if order == "desc":
            items.reverse()
        ids = [item.get("id") for item in items]
        for cursor, param in ((after, "after"), (before, "before")):
            if cursor is not None and cursor not in ids:
                raise APIError(400, f"'{param}' names no input item of this response: '{cursor}'.", param=param)
        start = ids.index(after) + 1 if after is not None else 0
        end = ids.index(before) if before is not None else len(items)
        page = items[start:end][:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + len(page) < end,
        }
