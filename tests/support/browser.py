"""A playground page in Playwright that fails its test if it raised or broke its own Content Security Policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def watched_page(opened: Any, url: str) -> Iterator[Any]:
    """``opened`` (a new Playwright page) at ``url``; on leaving, an AssertionError listing any error the page
    raised or any CSP violation its console reported meanwhile."""
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
    opened.goto(url)
    yield opened
    assert not errors, f"the page raised or broke its own policy: {errors}"
