"""A route's request body as its pydantic model (the routes parse their bodies by hand: one strict JSON parse,
the structure caps of :class:`~server.protocol.RequestBody` first).

A body past :data:`OFF_LOOP_BODY_BYTES` is parsed on the app's preparation pool, not on the event loop: pydantic
holds the interpreter lock while it parses a 4 MB body (tens of ms), but on a thread of its own it yields the
lock every switch interval, so ``/health`` and the streams keep answering meanwhile; a full pool answers 429
(:class:`~server.requests.preparation.PreparationPool`). Small bodies are parsed in place: a thread hop costs
more than their parse."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.requests.preparation import PreparationPool

BodyT = TypeVar("BodyT", bound=BaseModel)
OFF_LOOP_BODY_BYTES = 64 * 1024
"""Bodies longer than this are parsed on the preparation pool."""


async def parse_body(model: type[BodyT], request: Request, pool: PreparationPool | None = None) -> BodyT:
    """The request body as ``model``, parsed strictly from JSON (:class:`~server.http_guards.JsonContentType` has
    checked that it is declared so); pydantic's errors go through the same 400 handler as every invalid request."""
    body = await request.body()
    try:
        if pool is not None and len(body) > OFF_LOOP_BODY_BYTES:
            return await pool.run(lambda: model.model_validate_json(body))
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
