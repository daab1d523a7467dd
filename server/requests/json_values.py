"""JSON the client sends inside a field (a schema given as text, a tool call's arguments), read safely.

Python's ``json`` recurses once per nesting level: a string of a few thousand ``[`` raises RecursionError,
which would end as a 500. Here any such text is a 400 naming the field, and so is a value nested deeper
than :data:`MAX_JSON_DEPTH` (chat templates, ``json.dumps`` and grammar compilers recurse over it later),
and a text of more values than a whole request body may hold (``server.protocol_limits``), before it is read.
"""

from __future__ import annotations

import json
from typing import Any

from amulet_core.errors import InvalidParameterError
from server.protocol_limits import json_structure_excess

MAX_JSON_DEPTH = 64
"""Nesting levels (objects and arrays) a JSON value in a request field may have."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Levels of nested objects and arrays in ``value`` (0 for a scalar), counted without recursion; the
    count stops once it passes ``limit`` (so a huge value costs no more than its first ``limit + 1`` levels)."""
    depth = 0
    level = [value]
    while level:
        containers = [v for v in level if isinstance(v, (dict, list, tuple))]
        if not containers:
            break
        depth += 1
        if depth > limit:
            break
        level = [item for c in containers for item in (c.values() if isinstance(c, dict) else c)]
    return depth


def check_json_depth(value: Any, param: str, limit: int = MAX_JSON_DEPTH) -> None:
    """InvalidParameterError naming ``param`` when ``value`` nests deeper than ``limit`` levels."""
    if json_depth(value, limit) > limit:
        raise InvalidParameterError(param, f"'{param}' is nested more than {limit} levels deep.")


class NotJson(ValueError):
    """The text is not JSON (a ValueError, as ``json.loads`` raises)."""


def read_json(text: str, param: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``text`` read as JSON. InvalidParameterError naming ``param`` when it holds more values than a request
    body may, or nests deeper than ``limit`` levels (however deep: the parser's RecursionError is caught);
    :class:`NotJson` when it is not JSON at all."""
    excess = json_structure_excess(text)
    if excess is not None:
        raise InvalidParameterError(param, f"'{param}' holds {excess}.")
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidParameterError(param, f"'{param}' is nested more than {limit} levels deep.") from None
    except ValueError as exc:
        raise NotJson(str(exc)) from None
    check_json_depth(value, param, limit)
    return value


def load_json(text: str, param: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """:func:`read_json`, with text that is not JSON an InvalidParameterError naming ``param`` too."""
    try:
        return read_json(text, param, limit)
    except NotJson as exc:
        raise InvalidParameterError(param, f"'{param}' is not valid JSON: {exc}") from None
