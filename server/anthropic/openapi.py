"""The Messages route's request body and error answers for ``/openapi.json``, written out in place (the schema
components of the app are the chat's; these schemas carry their own definitions inlined)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from server.anthropic.errors import ERROR_TYPES, error_type
from server.anthropic.protocol import MessagesRequest
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


def messages_openapi_extra() -> dict[str, Any]:
    """The ``openapi_extra`` of ``POST /v1/messages``."""
    error = {"application/json": {"schema": self_contained(AnthropicErrorResponse)}}
    known = ", ".join(sorted(set(ERROR_TYPES.values())))
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": self_contained(MessagesRequest)}}},
        "responses": {
            str(status): {"description": f"Anthropic error object, type {error_type(status)} (one of {known})", "content": error}
            for status in _STATUSES
        },
    }
