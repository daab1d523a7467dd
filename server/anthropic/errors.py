"""Anthropic's error object, ``{"type": "error", "error": {"type", "message"}, "request_id"}``, for the errors of
the Messages route: :mod:`server.errors` answers with it on :func:`is_messages_route` (HTTP errors, whatever
layer raised them), and a stream's error becomes an ``error`` event (:func:`stream_error_event`).

The status codes stay the server's (400, 401, 404, 413, 429, 500, 503 ...); the ``type`` is Anthropic's for the
status. Anthropic's object has no ``param``, so the message names the field when it does not already.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.protocol_answers import ErrorInfo

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
"""Anthropic's error type of each status; another 4xx is an ``invalid_request_error``, another 5xx an ``api_error``."""

_STREAM_ERROR_TYPES = {"invalid_request_error": 400, "rate_limit_error": 429}
"""The status an error event of a stream stands for, by the server's (OpenAI) type; a server error is a 500 unless
its code says the engine is not there (then 503: ``overloaded_error``)."""
_UNAVAILABLE_CODES = frozenset({"engine_not_ready", "engine_stalled"})


def is_messages_route(scope: Mapping[str, Any]) -> bool:
    """Whether the request is for the Messages API (its routed path, less any ``root_path``, under ``/v1/messages``)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "") or "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_message(info: ErrorInfo) -> str:
    """The message, naming the field (``param``) in front when it does not already."""
    if info.param and info.param not in info.message:
        return f"{info.param}: {info.message}"
    return info.message


def error_body(status: int, info: ErrorInfo, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error object for an error of the server's (``info``) answered with ``status``."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": error_message(info)}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def stream_error_event(openai_payload: Mapping[str, Any]) -> str:
    """The ``error`` event for the OpenAI error object a stream carries (:mod:`server.serving_choices` writes it)."""
    error = openai_payload.get("error")
    error = error if isinstance(error, Mapping) else {}
    info = ErrorInfo(
        message=str(error.get("message") or "The stream failed."),
        type=str(error.get("type") or "server_error"),
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        code=error.get("code") if isinstance(error.get("code"), str) else None,
    )
    status = _STREAM_ERROR_TYPES.get(info.type, 503 if info.code in _UNAVAILABLE_CODES else 500)
    request_id = error.get("request_id")
    body = error_body(status, info, request_id if isinstance(request_id, str) else None)
    return sse_event("error", body)


def sse_event(name: str, payload: Mapping[str, Any]) -> str:
    """One named server-sent event, as Anthropic sends them (``event:`` then ``data:``)."""
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
