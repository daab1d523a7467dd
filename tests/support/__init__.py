"""Helpers the tests import (``from tests.support.<module> import ...``): no fixtures, no tests.

* :mod:`tests.support.live_server`: a real uvicorn server in a thread, polling helpers, a real engine behind it.
* :mod:`tests.support.fake_engine`: a deterministic EngineClient that records what it is asked.
* :mod:`tests.support.http`: what HTTP tests share (a user message, an API key, the OpenAI error shape).
* :mod:`tests.support.tiny_models`: tiny random-weight model configs and a saved tiny reward model.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root."""

ENSURE_PACKAGE = ROOT / "tests" / "tools" / "ensure_debian_package.sh"
"""Installs a Debian package when its binary is missing (the tests' Prometheus and Chromium)."""
