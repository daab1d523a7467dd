"""Stored preference profiles: a name and a preference object (what a request's ``preference`` field takes, as
JSON), owned by the API key (tenant) that made them, the name unique per owner.

A profile is visible only to its owner (``None``: the one caller of a server with no key or one key). It is found
by its id (``pp_...``) or its name. The store keeps whatever JSON it is given: checking a preference is the
caller's job (:mod:`server.profiles`). Every call is one transaction on the database's thread.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from server.store.backend import Row, Transaction, owner_column
from server.store.database import Database

ID_PREFIX = "pp_"
MAX_PROFILES_PER_OWNER = 1000
"""Profiles one API key may keep; creating one more is refused (:class:`TooManyProfiles`)."""
_COLUMNS = "id, name, preference, created_at, updated_at"


@dataclass(frozen=True)
class StoredProfile:
    id: str
    owner: str | None
    name: str
    preference: Any
    """The preference as JSON (a string, a list, or an object)."""
    created_at: float
    updated_at: float


class ProfileNameTaken(Exception):
    """The owner has another profile of that name."""


class TooManyProfiles(Exception):
    """The owner keeps :data:`MAX_PROFILES_PER_OWNER` profiles already."""


def new_profile_id() -> str:
    return f"{ID_PREFIX}{uuid.uuid4().hex}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _profile(row: Row, owner: str | None) -> StoredProfile:
    profile_id, name, preference, created_at, updated_at = row
    return StoredProfile(profile_id, owner, name, json.loads(preference), float(created_at), float(updated_at))


def _find(tx: Transaction, owner: str, ref: str) -> list[Row]:
    """The owner's profile of id or name ``ref`` (an id first: names never look like ids, see server.profiles)."""
    column = "id" if ref.startswith(ID_PREFIX) else "name"
    return tx.execute(f"SELECT {_COLUMNS} FROM preference_profiles WHERE owner = ? AND {column} = ?", (owner, ref))


def _name_taken(tx: Transaction, owner: str, name: str, other_than: str = "") -> bool:
    rows = tx.execute("SELECT id FROM preference_profiles WHERE owner = ? AND name = ? AND id <> ?", (owner, name, other_than))
    return bool(rows)


class ProfileStore:
    """The preference profiles in ``database`` (see the module docstring)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def now(self) -> float:
        return self.database.config.clock()

    async def create(self, owner: str | None, name: str, preference: Any) -> StoredProfile:
        """A new profile (ProfileNameTaken, TooManyProfiles; StoreError when the database fails)."""
        key, now = owner_column(owner), self.now()
        profile = StoredProfile(new_profile_id(), owner, name, preference, now, now)

        def write(tx: Transaction) -> str:
            if _name_taken(tx, key, name):
                return "taken"
            if tx.execute("SELECT COUNT(*) FROM preference_profiles WHERE owner = ?", (key,))[0][0] >= MAX_PROFILES_PER_OWNER:
                return "full"
            tx.execute(
                "INSERT INTO preference_profiles (id, owner, name, preference, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (profile.id, key, name, _json(preference), now, now),
            )
            return "created"

        outcome = await self.database.run(write)
        if outcome == "taken":
            raise ProfileNameTaken(name)
        if outcome == "full":
            raise TooManyProfiles(name)
        return profile

    async def get(self, owner: str | None, ref: str) -> StoredProfile | None:
        """The owner's profile of id or name ``ref``; None when there is none (another owner's, deleted)."""
        rows = await self.database.run(lambda tx: _find(tx, owner_column(owner), ref))
        return _profile(rows[0], owner) if rows else None

    async def list_owned(self, owner: str | None) -> list[StoredProfile]:
        """The owner's profiles, oldest first."""
        key = owner_column(owner)

        def read(tx: Transaction) -> list[Row]:
            return tx.execute(f"SELECT {_COLUMNS} FROM preference_profiles WHERE owner = ? ORDER BY seq", (key,))

        return [_profile(row, owner) for row in await self.database.run(read)]

    async def update(
        self, owner: str | None, profile_id: str, *, name: str | None = None, preference: Any = None
    ) -> StoredProfile | None:
        """Set the given fields of the owner's profile ``profile_id`` (PATCH: None leaves one as it is); the
        profile as it is now, None when there is none (ProfileNameTaken when another has that name)."""
        key, now = owner_column(owner), self.now()

        def write(tx: Transaction) -> list[Row] | str:
            if name is not None and _name_taken(tx, key, name, other_than=profile_id):
                return "taken"
            sets, params = ["updated_at = ?"], list[Any]([now])
            if name is not None:
                sets.append("name = ?")
                params.append(name)
            if preference is not None:
                sets.append("preference = ?")
                params.append(_json(preference))
            tx.execute(f"UPDATE preference_profiles SET {', '.join(sets)} WHERE owner = ? AND id = ?", (*params, key, profile_id))
            return _find(tx, key, profile_id)

        rows = await self.database.run(write)
        if isinstance(rows, str):
            raise ProfileNameTaken(name)
        return _profile(rows[0], owner) if rows else None

    async def delete(self, owner: str | None, ref: str) -> StoredProfile | None:
        """Delete the owner's profile of id or name ``ref``; the profile it was (None when there was none)."""
        key = owner_column(owner)

        def remove(tx: Transaction) -> list[Row]:
            found = _find(tx, key, ref)
            if found:
                tx.execute("DELETE FROM preference_profiles WHERE owner = ? AND id = ?", (key, found[0][0]))
            return found

        rows = await self.database.run(remove)
        return _profile(rows[0], owner) if rows else None
