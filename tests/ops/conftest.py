"""Fixtures of the operations tests: Prometheus, installed with apt-get when it is missing."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import ROOT

ENSURE_PROMETHEUS = ROOT / "tests" / "tools" / "ensure_prometheus.sh"


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The ``prometheus`` binary (``promtool`` is next to it), installed from Debian's package when missing.

    Skips only where it cannot be installed (no apt-get, or not root); a failed install fails.
    """
    result = subprocess.run(["bash", str(ENSURE_PROMETHEUS)], capture_output=True, text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(f"Prometheus cannot be installed here: {result.stderr.strip()}")
    assert result.returncode == 0, f"installing Prometheus failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]
