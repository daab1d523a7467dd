"""An app that is dropped without being shut down (tests, a failed start-up) is collected cleanly, from any thread.

Python runs a collection inside whatever allocation sets it off, in any thread, and that may be inside a
``ThreadPoolExecutor.submit``, which holds ``concurrent.futures``' global lock while it allocates the future and the
thread. Anything the collection runs for the app there must neither submit nor wait: the suite once hung for good
in an unrelated test (a finalizer closing a dropped app's database submitted to its executor under that lock).
The check runs in a process of its own, so that a hang there fails this test instead of stalling the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HANG_LIMIT_S = 240
"""Far beyond the few seconds the check takes (imports included) on a busy machine; only a hang reaches it."""

SCRIPT = textwrap.dedent(
    """
    import asyncio, concurrent.futures.thread, gc, threading, time

    import httpx

    from server.app import create_app
    from server.config import ServerConfig
    from tests.support.fake_engine import FakeEngine

    CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    async def use(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            chat = await client.post("/v1/chat/completions", json=CHAT)  # the preparation pool's thread
            stored = await client.get("/v1/responses/resp_none")  # the database's thread and connection
        return chat.status_code, stored.status_code

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith(("amulet-store", "amulet-prepare"))]

    gc.disable()  # no collection before the one below
    assert asyncio.run(use(create_app(FakeEngine(), ServerConfig()))) == (200, 404)
    assert ours(), "the app's threads did not start"
    with concurrent.futures.thread._global_shutdown_lock:  # as inside any executor's submit
        collected = gc.collect()
    assert collected > 0
    for _ in range(600):  # the executors' own clean-up ends their idle threads once they are collected
        if not ours():
            break
        time.sleep(0.1)
    assert not ours(), ours()
    print("collected cleanly")
    """
)


def test_a_dropped_app_is_collected_inside_an_executor_submit_without_a_hang() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=HANG_LIMIT_S, check=False
    )
    assert done.returncode == 0 and "collected cleanly" in done.stdout, done.stdout + done.stderr
