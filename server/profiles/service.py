"""The preference profiles of a server: checked, stored per API key, answered as profile objects, and resolved
for a request that names one (``"preference": {"profile": ...}``).

A profile's preference is checked by the code that checks a request's (:func:`~server.requests.preference.plan_of`,
with the server's ``--max-preferences`` and ``--preference-placement``), so a bad one is the same 400 naming the
same field (``preference.coefficient`` ...). Errors: a duplicate name 409 (``name``); a profile that is not the
caller's 404; a request naming an unknown profile 400 naming ``preference.profile`` (the request, not the URL, is
wrong); a failing database 503 (``store_unavailable``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amulet_core.errors import InvalidParameterError
from server.config import ServerConfig
from server.errors import SERVER_ERROR, APIError
from server.profiles.protocol import ProfileCreate, ProfileUpdate, profile_object
from server.profiles.values import loaded, overlaid, stored_form
from server.protocol import PreferenceSpec
from server.requests.preference import Preference, plan_of
from server.store.database import StoreError
from server.store.profiles import MAX_PROFILES_PER_OWNER, ProfileNameTaken, ProfileStore, StoredProfile, TooManyProfiles

STORE_FAILED_MESSAGE = "The preference profile store failed (the server log has the details under this request id); retry."


def store_failed(retry_after_s: int) -> APIError:
    return APIError(
        503, STORE_FAILED_MESSAGE, type=SERVER_ERROR, code="store_unavailable", headers={"Retry-After": str(retry_after_s)}
    )


def not_found(ref: str) -> APIError:
    return APIError(404, f"Preference profile '{ref}' not found.", code="not_found")


def name_taken(name: str) -> APIError:
    return APIError(409, f"A preference profile named '{name}' exists already.", param="name", code="profile_name_taken")


class PreferenceProfiles:
    """See the module docstring. ``owner``: the caller's tenant (:func:`server.auth.tenant_of`)."""

    def __init__(self, store: ProfileStore, config: ServerConfig) -> None:
        self.store = store
        self.config = config

    def check(self, preference: Preference) -> None:
        """Refuse a preference no request could use (InvalidParameterError naming ``preference...``)."""
        if isinstance(preference, PreferenceSpec) and preference.profile is not None:
            raise InvalidParameterError("preference.profile", "A profile's preference cannot name another profile.")
        plan_of(preference, self.config.max_preferences, self.config.preference_placement)

    @contextmanager
    def _store_failures(self) -> Iterator[None]:
        """A failing database, as the 503 every profile route answers for it (``store_unavailable``)."""
        try:
            yield
        except StoreError as exc:
            raise store_failed(self.config.retry_after_s) from exc

    async def _found(self, ref: str, owner: str | None) -> StoredProfile:
        with self._store_failures():
            profile = await self.store.get(owner, ref)
        if profile is None:
            raise not_found(ref)
        return profile

    async def create(self, body: ProfileCreate, owner: str | None) -> dict[str, Any]:
        self.check(body.preference)
        with self._store_failures():
            try:
                profile = await self.store.create(owner, body.name, stored_form(body.preference))
            except ProfileNameTaken:
                raise name_taken(body.name) from None
            except TooManyProfiles:
                raise APIError(
                    400, f"An API key keeps at most {MAX_PROFILES_PER_OWNER} preference profiles.", code="too_many_profiles"
                ) from None
        return profile_object(profile)

    async def listing(self, owner: str | None) -> dict[str, Any]:
        with self._store_failures():
            profiles = await self.store.list_owned(owner)
        data = [profile_object(p) for p in profiles]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    async def retrieve(self, ref: str, owner: str | None) -> dict[str, Any]:
        return profile_object(await self._found(ref, owner))

    async def update(self, ref: str, body: ProfileUpdate, owner: str | None) -> dict[str, Any]:
        profile = await self._found(ref, owner)
        preference: Any = None
        if body.preference is not None:
            new = body.preference
            if isinstance(new, PreferenceSpec):
                if new.profile is not None:
                    raise InvalidParameterError("preference.profile", "A profile's preference cannot name another profile.")
                new = overlaid(loaded(profile.preference), new)
            self.check(new)
            preference = stored_form(new)
        with self._store_failures():
            try:
                updated = await self.store.update(owner, profile.id, name=body.name, preference=preference)
            except ProfileNameTaken:
                raise name_taken(body.name or "") from None
        if updated is None:  # deleted meanwhile
            raise not_found(ref)
        return profile_object(updated)

    async def delete(self, ref: str, owner: str | None) -> dict[str, Any]:
        with self._store_failures():
            deleted = await self.store.delete(owner, ref)
        if deleted is None:
            raise not_found(ref)
        return {"id": deleted.id, "object": "preference_profile.deleted", "deleted": True}

    async def resolve(self, fields: PreferenceSpec, owner: str | None) -> Preference:
        """The preference a request's ``{"profile": ..., <fields>}`` stands for: the owner's profile with the
        request's other fields over it. An unknown profile is a 400 naming ``preference.profile``."""
        ref = fields.profile or ""
        with self._store_failures():
            profile = await self.store.get(owner, ref)
        if profile is None:
            raise APIError(
                400,
                f"No preference profile '{ref}' (an id or a name) for this API key; see GET /v1/preference_profiles.",
                param="preference.profile",
                code="preference_profile_not_found",
            )
        return overlaid(loaded(profile.preference), fields)
