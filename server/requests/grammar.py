"""The shape a request asks its answer to take, as a GrammarSpec for the engine.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and vLLM's
``structured_outputs`` / ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``
extras: at most one of them per request. The engine compiles the grammar (llguidance) and masks
the distribution the method produced, once per step; errors name the field the grammar came from.
"""

from __future__ import annotations

import json
from typing import Any

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import MAX_CHOICES, MAX_GRAMMAR_CHARS, GrammarKind, GrammarSpec, check_grammar_size
from server.protocol import GenerationFields
from server.requests.json_values import check_json_depth, load_json

MAX_SCHEMA_CHARS = MAX_GRAMMAR_CHARS
"""Characters of a JSON schema (as given, and as written out compactly): every client grammar's cap."""


def schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """A JSON schema (an object, or JSON text of one) as the JSON text a GrammarSpec takes. InvalidParameterError
    naming ``param`` when it is not an object, is longer than :data:`MAX_SCHEMA_CHARS` (the text is measured
    before it is read) or nests deeper than ``json_values.MAX_JSON_DEPTH``."""
    if isinstance(schema, str):
        check_grammar_size(GrammarKind.JSON_SCHEMA, schema, param)
        schema = load_json(schema, param)
    else:
        check_json_depth(schema, param)
    if not isinstance(schema, dict):
        raise InvalidParameterError(param, f"'{param}' must be a JSON schema object.")
    text = json.dumps(schema, ensure_ascii=False, sort_keys=True)
    check_grammar_size(GrammarKind.JSON_SCHEMA, text, param)
    return text


def _choice_text(choices: list[str], param: str) -> str:
    if not choices or any(not c for c in choices):
        raise InvalidParameterError(param, f"'{param}' needs at least one non-empty string.")
    if len(choices) > MAX_CHOICES:
        raise InvalidParameterError(param, f"'{param}' takes at most {MAX_CHOICES} choices, got {len(choices)}.")
    size = sum(len(c) for c in choices)
    if size > MAX_GRAMMAR_CHARS:
        raise InvalidParameterError(
            param, f"The choices of '{param}' are {size} characters long in all, more than the {MAX_GRAMMAR_CHARS} allowed."
        )
    return json.dumps(choices, ensure_ascii=False)


def _candidates(body: GenerationFields) -> list[GrammarSpec]:
    specs: list[GrammarSpec] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(GrammarSpec(GrammarKind.JSON_OBJECT, "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise InvalidParameterError("response_format.json_schema", "'json_schema' is required for this type.")
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {"type": "object"}
        param = "response_format.json_schema.schema"
        specs.append(GrammarSpec(GrammarKind.JSON_SCHEMA, schema_text(schema, param), "response_format"))
    so = body.structured_outputs
    if so is not None:
        given: list[tuple[GrammarKind, Any]] = [
            (GrammarKind.JSON_SCHEMA, so.json_),
            (GrammarKind.REGEX, so.regex),
            (GrammarKind.CHOICE, so.choice),
            (GrammarKind.LARK, so.grammar),
            (GrammarKind.JSON_OBJECT, so.json_object or None),
        ]
        present = [(kind, value) for kind, value in given if value is not None]
        if len(present) != 1:
            raise InvalidParameterError(
                "structured_outputs", "'structured_outputs' takes exactly one of json, regex, choice, grammar, json_object."
            )
        kind, value = present[0]
        specs.append(_spec(kind, value, "structured_outputs"))
    guided: tuple[tuple[GrammarKind, Any, str], ...] = (
        (GrammarKind.JSON_SCHEMA, body.guided_json, "guided_json"),
        (GrammarKind.REGEX, body.guided_regex, "guided_regex"),
        (GrammarKind.CHOICE, body.guided_choice, "guided_choice"),
        (GrammarKind.LARK, body.guided_grammar, "guided_grammar"),
    )
    for kind, value, param in guided:
        if value is not None:
            specs.append(_spec(kind, value, param))
    return specs


def _spec(kind: GrammarKind, value: Any, param: str) -> GrammarSpec:
    if kind is GrammarKind.JSON_SCHEMA:
        return GrammarSpec(kind, schema_text(value, param), param)
    if kind is GrammarKind.CHOICE:
        return GrammarSpec(kind, _choice_text(value, param), param)
    if kind is GrammarKind.JSON_OBJECT:
        return GrammarSpec(kind, "", param)
    if not value:
        raise InvalidParameterError(param, f"'{param}' must not be empty.")
    check_grammar_size(kind, value, param)
    return GrammarSpec(kind, value, param)


def requested_grammar(body: GenerationFields, forced: GrammarSpec | None = None) -> GrammarSpec | None:
    """The grammar the request's fields ask for, or None for free text. More than one is a 400, and so is
    one beside a ``forced`` grammar (a tool call that ``tool_choice`` requires)."""
    specs = _candidates(body)
    if forced is not None:
        if specs:
            raise InvalidParameterError(specs[0].param, f"'{specs[0].param}' cannot be combined with a forced 'tool_choice'.")
        return forced
    if len(specs) > 1:
        raise InvalidParameterError(
            specs[1].param, f"'{specs[0].param}' and '{specs[1].param}' both constrain the answer; give one."
        )
    return specs[0] if specs else None
