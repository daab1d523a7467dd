"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

One table (:func:`describe_exception`) maps exceptions to status, type and code; the exception
handlers and the error events of a stream both use it, so a failure reads the same either way.

Server-side failures (5xx) carry a stable message and code per kind (``generation_failed``,
``internal_error``, ``engine_not_ready`` ...), never exception text, plus the request's id
(``request_id``, also in the ``x-request-id`` header) that the server's log line of the failure names.

On the Anthropic Messages route (``/v1/messages``) the same description is answered in Anthropic's error shape
(:mod:`server.anthropic.errors`): :func:`error_response` picks it by the request's path, for every layer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from amulet_core.errors import (
    EngineNotReadyError,
    EngineOverloadedError,
    EngineStalledError,
    InvalidParameterError,
    RequestFailedError,
)
from server.anthropic.errors import error_body as anthropic_error_body
from server.anthropic.errors import is_messages_route
from server.protocol_answers import ErrorInfo, ErrorResponse
from server.request_id import REQUEST_ID_HEADER, request_id_of

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
GENERATION_FAILED_MESSAGE = "The generation failed; the server log has the details under this request id."
ENGINE_STALLED_MESSAGE = "The engine stopped making progress; this server is restarting. Retry shortly."
INTERNAL_ERROR_MESSAGE = "Internal server error; the server log has the details under this request id."


class APIError(Exception):
    """An error the HTTP layer raises itself (auth, unknown model, body too large ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class ErrorDescription:
    status: int
    info: ErrorInfo
    headers: dict[str, str] = field(default_factory=dict)


def describe_exception(exc: BaseException, retry_after_s: int = 1) -> ErrorDescription:
    """Status, OpenAI error body and headers for any exception; unknown ones become a bare 500."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, APIError):
        return ErrorDescription(
            exc.status, ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code), exc.headers
        )
    if isinstance(exc, InvalidParameterError):
        code = getattr(exc, "code", None)
        return ErrorDescription(400, ErrorInfo(message=exc.message, type=INVALID_REQUEST, param=exc.param, code=code))
    if isinstance(exc, EngineOverloadedError):
        message = str(exc) or "The server is at capacity; retry later."
        return ErrorDescription(429, ErrorInfo(message=message, type="rate_limit_error", code="engine_overloaded"), retry)
    if isinstance(exc, EngineStalledError):  # the reason (e.g. how long the step ran) stays in the server log
        return ErrorDescription(503, ErrorInfo(message=ENGINE_STALLED_MESSAGE, type=SERVER_ERROR, code="engine_stalled"), retry)
    if isinstance(exc, EngineNotReadyError):
        message = str(exc) or "The model is not loaded yet; retry later."
        return ErrorDescription(503, ErrorInfo(message=message, type=SERVER_ERROR, code="engine_not_ready"), retry)
    if isinstance(exc, RequestFailedError):  # its text (engine internals) stays in the server log
        return ErrorDescription(500, ErrorInfo(message=GENERATION_FAILED_MESSAGE, type=SERVER_ERROR, code="generation_failed"))
    return ErrorDescription(500, ErrorInfo(message=INTERNAL_ERROR_MESSAGE, type=SERVER_ERROR, code="internal_error"))


def error_payload(info: ErrorInfo, request_id: str | None = None) -> dict[str, Any]:
    """The OpenAI error body; a server error (``type`` server_error) also carries ``request_id`` when known."""
    payload = ErrorResponse(error=info).model_dump()
    if request_id is not None and info.type == SERVER_ERROR:
        payload["error"]["request_id"] = request_id
    return payload


def error_response(desc: ErrorDescription, request_id: str | None = None, scope: Mapping[str, Any] | None = None) -> JSONResponse:
    """The JSON answer of ``desc`` (a 5xx one names ``request_id``, see :func:`error_payload`), with the
    ``x-request-id`` header (also for answers sent from outside :class:`RequestIdMiddleware`). For a request
    (``scope``) to the Anthropic Messages API, Anthropic's error object (:mod:`server.anthropic.errors`)."""
    headers = dict(desc.headers)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    if scope is not None and is_messages_route(scope):
        payload = anthropic_error_body(desc.status, desc.info, request_id)
    else:
        payload = error_payload(desc.info, request_id)
    return JSONResponse(payload, status_code=desc.status, headers=headers or None)


async def send_error(scope: Scope, receive: Receive, send: Send, exc: BaseException) -> None:
    """Answer an ASGI request with the error of ``exc`` (for middlewares, before the app runs)."""
    await error_response(describe_exception(exc), request_id_of(scope), scope)(scope, receive, send)


# pydantic names union branches inside `loc` ("str", "list[str]", "PreferenceSpec"); they are not params.
_UNION_TAG = re.compile(r"^(str|int|float|bool|[A-Z].*|.*[\[(].*)$")


def _param_from_loc(loc: Sequence[Any], keep_last: bool = False) -> str | None:
    """The dotted param of a pydantic error location; ``keep_last`` keeps a last part that looks like a
    union tag (an unknown key the client sent, such as "Lambda", is never a tag)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    param = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _UNION_TAG.match(str(part)) or (keep_last and i == len(parts) - 1):
            param += f".{part}" if param else str(part)
    return param or None


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ErrorInfo:
    """One 400 message from pydantic's errors: the most specific (deepest) error names the param."""
    if not errors:
        return ErrorInfo(message="Invalid request.", type=INVALID_REQUEST)
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error") or detail.get("msg", "")
        return ErrorInfo(message=f"The request body is not valid JSON: {reason}", type=INVALID_REQUEST)
    for error in errors:  # a request model's cross-field rule (a model validator) names its own field
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidParameterError):
            return ErrorInfo(message=cause.message, type=INVALID_REQUEST, param=cause.param)
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _param_from_loc(error.get("loc", ()), keep_last=error.get("type") == "extra_forbidden")
    if error.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else f"Invalid request: {msg}"
    return ErrorInfo(message=message, type=INVALID_REQUEST, param=param)


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Route every failure through the OpenAI error shape (never FastAPI's 422 or an HTML page)."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ErrorDescription(400, describe_validation_errors(exc.errors())), scope=request.scope)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        info = ErrorInfo(message=str(exc.detail), type=INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR, code=code)
        return error_response(ErrorDescription(exc.status_code, info, dict(exc.headers or {})), scope=request.scope)

    async def on_known(request: Request, exc: Exception) -> JSONResponse:
        return error_response(describe_exception(exc, retry_after_s), request_id_of(request.scope), request.scope)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so the server logs the traceback; the client sees none.
        request_id = request_id_of(request.scope)
        logger.error("Request %s failed with an internal error: %s", request_id, type(exc).__name__)
        return error_response(describe_exception(exc, retry_after_s), request_id, request.scope)

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    for cls in (APIError, InvalidParameterError, EngineOverloadedError, EngineNotReadyError, RequestFailedError):
        app.add_exception_handler(cls, on_known)
    app.add_exception_handler(Exception, on_unexpected)
