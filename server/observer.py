"""The hook through which the serving layer reports each request to metrics (or anything else).

The serving layer calls these from the event loop; implementations must be cheap and must
never raise into the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request looked like from the server's side."""

    method: str
    """base, pref, la or amulet ("base" when the request had no preference)."""
    finish_reason: str
    """stop, length, abort (client went away) or error."""
    prompt_tokens: int
    completion_tokens: int
    e2e_s: float
    ttft_s: float | None = None
    queue_s: float | None = None
    inter_token_s: tuple[float, ...] = ()
    contexts: int = 1
    """Contexts decoded together for each answer: 1 for base, K preferences plus the contrast for amulet and la."""


class RequestObserver(Protocol):
    def request_finished(self, record: RequestRecord) -> None: ...


class NullObserver:
    """Observer that records nothing."""

    def request_finished(self, record: RequestRecord) -> None:
        return None
