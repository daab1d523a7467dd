"""A request id for every HTTP answer: the ``x-request-id`` header, ``request_id`` in 5xx error bodies and
stream error events, and the same id in the server's log line for that failure, so an operator can find
what went wrong from what the client saw (the client only gets a stable message and code).
"""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
_STATE_KEY = "request_id"


def new_request_id() -> str:
    """A fresh, unguessable id (``req-`` and 32 hex digits); never taken from the client, so it is safe to log."""
    return f"req-{uuid.uuid4().hex}"


def request_id_of(scope: MutableMapping[str, Any]) -> str | None:
    """The id :class:`RequestIdMiddleware` gave this request (None outside it, e.g. an app built without it)."""
    state = scope.get("state")
    return state.get(_STATE_KEY) if isinstance(state, dict) else None


class RequestIdMiddleware:
    """Gives every HTTP request an id (in ``scope["state"]``, so ``request.state.request_id`` reads it) and
    sends it back in the ``x-request-id`` header of the answer, whichever layer answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})[_STATE_KEY] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if all(name.lower() != header[0] for name, _ in headers):  # error answers may carry it already
                    message["headers"] = [*headers, header]
            await send(message)

        await self.app(scope, receive, send_with_id)
