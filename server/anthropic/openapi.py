"""The Messages routes' request bodies and error answers for ``/openapi.json``, written out in place (the schema
components of the app are the chat's; these schemas carry their own definitions inlined)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from server.anthropic.errors import ERROR_TYPES, error_type
from server.anthropic.protocol import CountTokensRequest, MessagesBody, MessagesRequest
from server.openapi_schemas import self_contained


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error object (:mod:`server.anthropic.errors`)."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None


_STATUSES = (400, 401, 404, 408, 413, 415, 429, 500, 503)


class MessageTokensCount(BaseModel):
    """The answer of ``POST /v1/messages/count_tokens``."""

    input_tokens: int


def _openapi_extra(body: type[MessagesBody], statuses: tuple[int, ...]) -> dict[str, Any]:
    error = {"application/json": {"schema": self_contained(AnthropicErrorResponse)}}
    known = ", ".join(sorted(set(ERROR_TYPES.values())))
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": self_contained(body)}}},
        "responses": {
            str(status): {"description": f"Anthropic error object, type {error_type(status)} (one of {known})", "content": error}
            for status in statuses
        },
    }


def messages_openapi_extra() -> dict[str, Any]:
    """The ``openapi_extra`` of ``POST /v1/messages``."""
    return _openapi_extra(MessagesRequest, _STATUSES)


def count_tokens_openapi_extra() -> dict[str, Any]:
    """The ``openapi_extra`` of ``POST /v1/messages/count_tokens`` (its 200 answer: ``{"input_tokens": N}``)."""
    extra = _openapi_extra(CountTokensRequest, tuple(s for s in _STATUSES if s not in (408, 500)))
    count = {"application/json": {"schema": self_contained(MessageTokensCount)}}
    extra["responses"]["200"] = {"description": "The prompt's tokens", "content": count}
    return extra
