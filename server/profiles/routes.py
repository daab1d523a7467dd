"""The routes of the preference profiles: ``POST`` and ``GET /v1/preference_profiles``, ``GET``, ``PATCH`` and
``DELETE /v1/preference_profiles/{id_or_name}`` (each the caller's own, behind the API key like every route)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel

from server.auth import tenant_of
from server.profiles.protocol import ProfileCreate, ProfileUpdate
from server.profiles.service import PreferenceProfiles
from server.request_body import parse_body

PROFILES_PATH = "/v1/preference_profiles"
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_STATUSES = {
    400: "Invalid profile (OpenAI error object naming the field)",
    401: "Missing or wrong API key",
    404: "No such profile for this API key",
    409: "This API key has a profile of that name already",
    503: "The database is unavailable; see Retry-After",
}


def _openapi_extra(model: type[BaseModel] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "responses": {str(status): {"description": text, "content": _ERROR} for status, text in _STATUSES.items()}
    }
    if model is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    return extra


def mount_preference_profiles(app: FastAPI, profiles: PreferenceProfiles) -> None:
    """The routes above, over ``profiles``."""

    @app.post(PROFILES_PATH, openapi_extra=_openapi_extra(ProfileCreate))
    async def create_profile(request: Request) -> dict[str, Any]:
        return await profiles.create(await parse_body(ProfileCreate, request), tenant_of(request.scope))

    @app.get(PROFILES_PATH, openapi_extra=_openapi_extra(None))
    async def list_profiles(request: Request) -> dict[str, Any]:
        return await profiles.listing(tenant_of(request.scope))

    @app.get(PROFILES_PATH + "/{ref}", openapi_extra=_openapi_extra(None))
    async def retrieve_profile(ref: str, request: Request) -> dict[str, Any]:
        return await profiles.retrieve(ref, tenant_of(request.scope))

    @app.patch(PROFILES_PATH + "/{ref}", openapi_extra=_openapi_extra(ProfileUpdate))
    async def update_profile(ref: str, request: Request) -> dict[str, Any]:
        return await profiles.update(ref, await parse_body(ProfileUpdate, request), tenant_of(request.scope))

    @app.delete(PROFILES_PATH + "/{ref}", openapi_extra=_openapi_extra(None))
    async def delete_profile(ref: str, request: Request) -> dict[str, Any]:
        return await profiles.delete(ref, tenant_of(request.scope))
