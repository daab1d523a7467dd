"""A small async client for OpenAI-compatible chat completions (the eval's HTTP runner and the judge)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

MAX_RETRIES = 8
"""Retries of one call answered 429 or 503 (a full queue, a loading model), waiting as told."""


class HttpCallError(RuntimeError):
    """The endpoint refused a call or answered something that is not a chat completion."""


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


class ChatClient:
    """POSTs chat completions to ``base_url`` (ending in /v1) and returns the first choice."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            return await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise HttpCallError(f"{method} {self._client.base_url}{path} failed: {type(exc).__name__}: {exc}") from exc

    async def model_name(self) -> str:
        """The first model ``GET /models`` lists."""
        response = await self._send("GET", "models")
        if response.status_code != 200:
            raise HttpCallError(f"GET {response.request.url} answered {response.status_code}: {error_message(response)}")
        try:
            return str(response.json()["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise HttpCallError(f"GET {response.request.url} did not list a model.") from None

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The first choice of a non-streaming completion, with ``usage`` added."""
        for attempt in range(MAX_RETRIES + 1):
            response = await self._send("POST", "chat/completions", body)
            if response.status_code in (429, 503) and attempt < MAX_RETRIES:
                try:
                    wait = float(response.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(max(wait, 0.1), 30.0))
                continue
            if response.status_code != 200:
                raise HttpCallError(f"POST {response.request.url} answered {response.status_code}: {error_message(response)}")
            try:
                data = response.json()
                choice = dict(data["choices"][0])
                choice["usage"] = data.get("usage") or {}
                choice["message"]["content"]  # noqa: B018 - the field must be there
            except (ValueError, KeyError, IndexError, TypeError):
                raise HttpCallError(f"POST {response.request.url} answered no chat completion.") from None
            return choice
        raise HttpCallError("unreachable")

    async def aclose(self) -> None:
        await self._client.aclose()
