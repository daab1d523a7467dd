"""A preference as a profile keeps it (JSON, as given), and a request's (or a PATCH's) fields over a profile's.

A profile is stored as given: a string stays a string, so a request naming the profile decodes exactly as one
sending that string inline. Fields over it (``{"profile": "terse", "coefficient": 3}``) turn it into the object
form (a string or list becomes its ``text``) with each given field replacing the profile's; a field given as null
goes back to its default.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from amulet_core.errors import InvalidParameterError
from server.errors import describe_validation_errors
from server.profiles.protocol import PreferenceValue
from server.protocol import PreferenceSpec
from server.requests.preference import Preference

_PREFERENCE: TypeAdapter[Any] = TypeAdapter(PreferenceValue)
"""Validates and dumps a ``preference`` value (immutable)."""


def stored_form(preference: Preference) -> Any:
    """``preference`` as JSON to store (unset fields left out; ``lambda`` under that name)."""
    return _PREFERENCE.dump_python(preference, mode="json", by_alias=True, exclude_none=True)


def loaded(value: Any) -> Preference:
    """A stored preference, validated again as a request's (strictly, from JSON)."""
    result: Preference = _PREFERENCE.validate_json(json.dumps(value), strict=True)
    return result


def _object_form(preference: Preference) -> dict[str, Any]:
    if isinstance(preference, PreferenceSpec):
        form: dict[str, Any] = preference.model_dump(mode="json", by_alias=True, exclude_none=True)
        return form
    return {"text": stored_form(preference)}


def overlaid(base: Preference, fields: PreferenceSpec) -> Preference:
    """``base`` with the fields set in ``fields`` (all but ``profile``) over it; ``base`` itself when none is."""
    given = sorted(fields.model_fields_set - {"profile"})
    if not given:
        return base
    merged = _object_form(base)
    for name in given:
        key = PreferenceSpec.model_fields[name].alias or name
        if getattr(fields, name) is None:
            merged.pop(key, None)
        else:
            merged[key] = fields.model_dump(mode="json", by_alias=True, include={name})[key]
    try:
        return PreferenceSpec.model_validate_json(json.dumps(merged))
    except ValidationError as exc:  # each field was valid on its own; named as the request's field all the same
        info = describe_validation_errors(exc.errors())
        param = f"preference.{info.param}" if info.param else "preference"
        raise InvalidParameterError(param, info.message) from None
