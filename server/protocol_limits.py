"""How many items each list (and entries each object) of a request may hold, checked before the items are.

A body of the size limit can hold about a million list items; validating each one (and building an error
for each invalid one) would hold the event loop for seconds, and merely parsing a million nested arrays takes
seconds too. So a request body's JSON structure is bounded before it is parsed (:func:`check_json_structure`:
at most :data:`MAX_JSON_CONTAINERS` objects and arrays and :data:`MAX_JSON_SEPARATORS` commas and colons,
counted outside strings), and every list and object field of the request models is capped, its count checked
before its items:

* a plain list field takes ``Field(max_length=...)``: pydantic counts a JSON array before validating its
  items, so an over-long one costs a single ``too_long`` error;
* a field whose type is a union with a list (``stop``, ``content``, ``preference``) or an object of typed
  values (``logit_bias``) takes :func:`items_at_most` or :func:`entries_at_most` as well: the count is
  checked before the union tries its branches (each of which would otherwise report on the whole list).
  The branches keep their ``max_length`` so the OpenAPI schema shows the caps.

The caps are generous for any real request; the sampling ones (``stop``, ``stop_token_ids``, ``logit_bias``)
are SamplingParams' own limits, the preference ones the core's (``MAX_PREFERENCES``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainValidator

from amulet_core.grammar.spec import MAX_CHOICES as MAX_CHOICES  # choice grammars: the grammar's own cap
from server.errors import APIError

MAX_JSON_CONTAINERS = 1 << 15
"""Objects and arrays in one request body (outside strings)."""
MAX_JSON_SEPARATORS = 1 << 18
"""Commas and colons in one request body (outside strings): about as many values and object keys."""

MAX_MESSAGES = 4096
"""Messages in one conversation."""
MAX_CONTENT_PARTS = 256
"""Content parts of one message."""
MAX_TOOLS = 128
"""Tools one request offers (OpenAI's limit)."""
MAX_TOOL_CALLS = 128
"""Tool calls in one assistant message of the history."""
MAX_PROMPTS = 256
"""Prompts in one text completion request (the fan-out budget may allow fewer at once)."""
MAX_PROMPT_TOKEN_IDS = 1 << 17
"""Token ids of one prompt (or of one /detokenize request): 131,072, a 128k context; a prompt longer than the
model's context is refused anyway."""
MAX_METADATA_ENTRIES = 16
"""Entries of ``metadata`` (OpenAI's limit)."""
MAX_TEMPLATE_KWARGS = 64
"""Entries of ``chat_template_kwargs``."""


def items_at_most(limit: int) -> BeforeValidator:
    """Refuse a list of more than ``limit`` items before anything in it is validated."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"at most {limit} items are allowed, got {len(value)}")
        return value

    return BeforeValidator(check)


def entries_at_most(limit: int) -> BeforeValidator:
    """Refuse an object of more than ``limit`` entries before any value in it is validated."""

    def check(value: Any) -> Any:
        if isinstance(value, dict) and len(value) > limit:
            raise ValueError(f"at most {limit} entries are allowed, got {len(value)}")
        return value

    return BeforeValidator(check)


def _is_id(value: Any) -> bool:
    return type(value) is int


def _token_ids(value: Any, where: str = "") -> list[int]:
    """``value`` when it is a list of at most MAX_PROMPT_TOKEN_IDS whole numbers; ``where`` prefixes the messages."""
    if not isinstance(value, list):
        raise ValueError(f"{where}must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_TOKEN_IDS:
        raise ValueError(f"{where}at most {MAX_PROMPT_TOKEN_IDS} token ids are allowed, got {len(value)}")
    bad = next((i for i, t in enumerate(value) if not _is_id(t)), None)
    if bad is not None:
        raise ValueError(f"{where}item {bad} must be a whole number (a token id), got {type(value[bad]).__name__}")
    return value


def _prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists; the shape is read
    from the first item and the count checked before the items."""
    if isinstance(value, str):
        return value
    shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if not isinstance(value, list):
        raise ValueError(f"must be {shape}")
    if not value or _is_id(value[0]):
        return _token_ids(value)
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed, got {len(value)}")
    if isinstance(value[0], str):
        bad = next((i for i, p in enumerate(value) if not isinstance(p, str)), None)
        if bad is not None:
            raise ValueError(f"item {bad} must be a string like the first, got {type(value[bad]).__name__}")
        return value
    if isinstance(value[0], list):
        return [_token_ids(p, f"prompt {i}: ") for i, p in enumerate(value)]
    raise ValueError(f"must be {shape}")


PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    PlainValidator(
        _prompt,
        json_schema_input_type=str
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[int], Field(max_length=MAX_PROMPT_TOKEN_IDS)]
        | Annotated[list[Annotated[list[int], Field(max_length=MAX_PROMPT_TOKEN_IDS)]], Field(max_length=MAX_PROMPTS)],
    ),
]
"""``/v1/completions``' ``prompt``, validated in one pass over its items (no union trying every branch on a
long list, no error per item)."""

TokenIds = Annotated[
    list[int],
    PlainValidator(_token_ids, json_schema_input_type=Annotated[list[int], Field(max_length=MAX_PROMPT_TOKEN_IDS)]),
]
"""A list of up to :data:`MAX_PROMPT_TOKEN_IDS` token ids (``/detokenize``), validated in one pass."""


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A JSON string, escapes included (for bodies with backslashes; others are split at their quotes)."""


def _structure(body: bytes) -> tuple[int, int]:
    """``(objects and arrays, commas and colons)`` in ``body``, wherever they are (strings included)."""
    return body.count(b"[") + body.count(b"{"), body.count(b",") + body.count(b":")


def json_structure_excess(text: str | bytes | bytearray) -> str | None:
    """What JSON ``text`` holds more of than the caps allow (``"JSON values"``, ...), or None when it is within them:
    at most :data:`MAX_JSON_CONTAINERS` objects and arrays and :data:`MAX_JSON_SEPARATORS` commas and colons
    outside its strings.

    Cheap first: a text whose characters stay under the caps wherever they are passes at once (a few ms for
    the largest body). Else a text whose strings alone are more than the values the caps allow (every string is
    a value or a key) is over; else the strings are cut out and the rest counted exactly."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    containers, separators = _structure(data)
    if containers <= MAX_JSON_CONTAINERS and separators <= MAX_JSON_SEPARATORS:
        return None
    strings = (data.count(b'"') - data.count(b'\\"')) // 2  # at least this many strings
    if strings > MAX_JSON_CONTAINERS + MAX_JSON_SEPARATORS + 1:
        return f"more than {MAX_JSON_CONTAINERS + MAX_JSON_SEPARATORS} JSON values"
    outside = b"".join(data.split(b'"')[::2]) if b"\\" not in data else _JSON_STRING.sub(b"", data)
    containers, separators = _structure(outside)
    if containers > MAX_JSON_CONTAINERS:
        return f"more than {MAX_JSON_CONTAINERS} JSON objects and arrays"
    if separators > MAX_JSON_SEPARATORS:
        return f"more than {MAX_JSON_SEPARATORS} JSON values"
    return None


def check_json_structure(body: str | bytes | bytearray) -> None:
    """Refuse a request body over the JSON structure caps (:func:`json_structure_excess`) before it is parsed:
    APIError 400, code ``request_too_complex``."""
    excess = json_structure_excess(body)
    if excess is not None:
        raise APIError(400, f"The request body holds {excess}; no valid request needs that many.", code="request_too_complex")
