"""The bodies of ``POST`` and ``PATCH /v1/preference_profiles`` and the profile object answered.

Unknown fields are refused (the API is this server's own: a misspelt field would silently do nothing). A name is
1 to 64 letters, digits, ``.``, ``_`` or ``-`` (it goes in a URL path) and never begins with ``pp_`` (profile ids
do: a reference is an id or a name, never both). ``preference`` takes exactly what a request's ``preference`` takes.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import ConfigDict, Field, model_validator

from amulet_core.errors import InvalidParameterError
from amulet_core.method.settings import MAX_PREFERENCES
from server.protocol import PreferenceList, PreferenceSpec
from server.protocol_base import RequestBody
from server.protocol_limits import items_at_most
from server.store.profiles import ID_PREFIX, StoredProfile

PROFILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PreferenceValue = Annotated[str | PreferenceList | PreferenceSpec, items_at_most(MAX_PREFERENCES)]
"""What a request's ``preference`` takes (a string, a list, or the object form)."""
ProfileName = Annotated[str, Field(pattern=PROFILE_NAME)]


class _ProfileBody(RequestBody):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _name_is_not_an_id(self) -> Self:
        name = getattr(self, "name", None)
        if name is not None and name.startswith(ID_PREFIX):
            raise InvalidParameterError("name", f"A profile's name must not begin with '{ID_PREFIX}' (its id does).")
        return self


class ProfileCreate(_ProfileBody):
    """``POST /v1/preference_profiles``."""

    name: ProfileName
    preference: PreferenceValue


class ProfileUpdate(_ProfileBody):
    """``PATCH /v1/preference_profiles/{id_or_name}``: the fields given change. An object ``preference`` is merged
    into the profile's (a field given as null goes back to its default); a string or a list replaces it."""

    name: ProfileName | None = None
    preference: PreferenceValue | None = None

    @model_validator(mode="after")
    def _no_removal(self) -> Self:
        for field in ("name", "preference"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise InvalidParameterError(field, f"A profile's '{field}' cannot be removed; give a new one or leave it out.")
        return self


def profile_object(profile: StoredProfile) -> dict[str, Any]:
    """The profile as answered (OpenAI-like: ``id``, ``object``, Unix times in whole seconds)."""
    return {
        "id": profile.id,
        "object": "preference_profile",
        "name": profile.name,
        "preference": profile.preference,
        "created_at": int(profile.created_at),
        "updated_at": int(profile.updated_at),
    }
