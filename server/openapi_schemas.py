"""Self-contained JSON schemas for ``/openapi.json``: the routes that parse their bodies by hand (Messages,
Responses) write their request schemas out in place, with pydantic's ``$defs`` inlined, because the app's schema
components are the chat's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with every ``#/$defs/...`` reference replaced by its definition, the reference's sibling keys
    kept (the models are not recursive)."""
    if isinstance(schema, list):
        return [inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        return inlined(definitions[ref.removeprefix("#/$defs/")] | rest, definitions)
    return {key: inlined(value, definitions) for key, value in schema.items() if key != "$defs"}


def self_contained(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of ``model`` with its definitions inlined."""
    schema = model.model_json_schema()
    return dict(inlined(schema, schema.get("$defs", {})))
