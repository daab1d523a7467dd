"""The Responses API's routes on an app: create, retrieve, delete and list a response's input items."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from server.errors import APIError
from server.openapi_schemas import self_contained
from server.request_body import parse_body
from server.responses.protocol import ResponsesRequest
from server.responses.serving import MAX_LISTED_ITEMS, OpenAIServingResponses

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_STATUSES = {
    400: "Invalid request (OpenAI error object)",
    401: "Missing or wrong API key",
    404: "Unknown model, or unknown previous_response_id",
    429: "Queue full; see Retry-After",
    500: "Generation failed",
    503: "Model loading, server shutting down or response store unavailable; see Retry-After",
}


def _openapi_extra() -> dict[str, Any]:
    """The hand-parsed body and the error answers of ``POST /v1/responses`` for ``/openapi.json``."""
    body = self_contained(ResponsesRequest)
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {str(status): {"description": text, "content": _ERROR} for status, text in _STATUSES.items()},
    }


def mount_responses(app: FastAPI, serving: OpenAIServingResponses) -> None:
    """``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``."""

    @app.post("/v1/responses", openapi_extra=_openapi_extra())
    async def create_response(request: Request) -> Response:
        return await serving.create(await parse_body(ResponsesRequest, request, serving.chat.admission.preparation), request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str, request: Request, stream: bool = False) -> dict[str, Any]:
        if stream:
            raise APIError(400, "Streaming a stored response again is not supported; retrieve it whole.", param="stream")
        return await serving.retrieve(response_id, request)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
        return await serving.delete(response_id, request)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED_ITEMS)] = 20,
        order: Literal["asc", "desc"] = "desc",
        after: Annotated[str | None, Query(max_length=256)] = None,
        before: Annotated[str | None, Query(max_length=256)] = None,
    ) -> dict[str, Any]:
        return await serving.input_items(response_id, request, limit=limit, order=order, after=after, before=before)
