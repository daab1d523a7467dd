"""The browser playground: three static files (``server/static``) served at ``/playground``, ``/`` redirecting there.

The page calls the public API like any client (same origin, so ``--cors-origins`` is not involved), so it
needs no key itself; its API calls send the key the user types. The files are read once when the routes
are mounted and served from memory with a strict Content-Security-Policy: only the page's own script and
stylesheet load, it connects only to its own origin, and nothing may frame it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

PLAYGROUND_PATH = "/playground"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_ASSETS: dict[str, tuple[str, str]] = {
    "": ("playground.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
"""Path under ``/playground`` -> (file in server/static, media type). Nothing else is served."""

PLAYGROUND_ROUTES: tuple[str, ...] = ("/", *(PLAYGROUND_PATH + suffix for suffix in _ASSETS))
"""Every route :func:`mount_playground` adds (open without a key: :mod:`server.access`)."""

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount_playground(app: FastAPI) -> None:
    """Add ``GET /`` (a redirect), ``GET /playground`` and its two assets to ``app`` (hidden from the API schema)."""
    static = files("server").joinpath("static")
    for suffix, (name, media_type) in _ASSETS.items():
        content = static.joinpath(name).read_bytes()
        app.add_api_route(
            PLAYGROUND_PATH + suffix,
            _serve(content, media_type),
            methods=["GET", "HEAD"],
            include_in_schema=False,
        )

    async def root() -> RedirectResponse:
        return RedirectResponse(PLAYGROUND_PATH, status_code=307)

    app.add_api_route("/", root, methods=["GET", "HEAD"], include_in_schema=False)


def _serve(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def endpoint() -> Response:
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    return endpoint
