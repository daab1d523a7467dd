"""The base classes of the API's request models: objects strictly typed and tolerant of fields they do not declare,
and whole request bodies bounded before they are parsed."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict

from server.protocol_limits import check_json_structure


class RequestObject(BaseModel):
    """Request objects: strictly typed, and tolerant of fields they do not declare (see request_policy)."""

    model_config = ConfigDict(extra="allow", strict=True)


class RequestBody(RequestObject):
    """A whole request body: its JSON structure is bounded before it is parsed (``model_validate_json`` runs
    :func:`~server.protocol_limits.check_json_structure` first, an APIError 400 for a body of more objects,
    arrays or values than any valid request has)."""

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        check_json_structure(json_data)
        return super().model_validate_json(json_data, **kwargs)
