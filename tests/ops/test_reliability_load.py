"""A reduced run of the load test (``python -m benchmarks.load``) against a real server subprocess.

16 concurrent streaming clients send 60 requests mixing base/pref/la/amulet and three prompt
lengths; a quarter of the clients walk away at random points. Same pass criteria as the full run
(no 5xx but intended 429/503, every completed stream well formed, the engine back to 0 running
requests and 0 KV in use, server RSS growth under 10% from request 20 to the last). No timing
is asserted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.load import LoadConfig, run_load, server_process

pytestmark = [pytest.mark.smollm, pytest.mark.slow]


def test_reduced_load_run(tmp_path: Path) -> None:
    config = LoadConfig(clients=16, requests=60, max_tokens=(4, 8), rss_baseline_after=20, seed=7)
    args = ["--max-model-len", "512", "--log-level", "warning", "--drain-timeout", "5"]
    # One torch thread: the 16 clients run on the same 2 cores (see test_reliability_faults).
    with server_process(args, tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as server:
        result = asyncio.run(run_load(server.url, config, server.pid))
        log = server.log
    assert result.failures == [], "\n".join(result.failures[:20]) + "\n" + log()[-3000:]
    summary = result.summary()
    assert summary["requests"] == 60
    assert summary["disconnected"] > 0 and summary["completed"] > 0
    assert {o.method for o in result.completed} == {"base", "pref", "la", "amulet"}
    assert result.rss_growth is not None
    assert server.process.returncode == 0, log()[-3000:]  # stopped with SIGTERM: drained, exit 0
