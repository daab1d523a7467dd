"""Crash-only operation of a real ``amulet-server`` process (no model is needed, so these are fast).

* A model that fails to load makes the process exit with status 4, the reason on stderr, so a
  supervisor restarts it; ``--wait-for-model`` keeps it up instead (``/health`` 200, ``/ready`` 503).
* ``--api-key-file`` (and ``$AMULET_API_KEY_FILE``) accepts every key of the file (rotation) and no
  other; the keys appear in no log line, no ``/metrics`` and no answer. An empty key file is a usage
  error (status 2) at startup.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.load import ServerProcess
from server.supervision import EXIT_LOAD_FAILED, EXIT_USAGE
from tests.support import ROOT
from tests.support.http import assert_no_leak
from tests.support.live_server import free_port, wait_until

KEYS = ("sk-rotated-old-5e1b7d", "sk-rotated-new-93c0aa")
OTHER_KEY = "sk-never-issued-4242"
EXIT_DEADLINE_S = 300.0
"""Generous: importing torch and transformers takes seconds, far more on a busy machine."""


def not_a_model(tmp_path: Path) -> str:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    return str(folder)


def run_server(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=EXIT_DEADLINE_S, check=False)


def test_a_model_that_fails_to_load_exits_with_status_4(tmp_path: Path) -> None:
    folder = not_a_model(tmp_path)
    result = run_server(["--model", folder])
    assert result.returncode == EXIT_LOAD_FAILED, result.stderr[-4000:]
    assert "The model failed to load" in result.stderr and folder in result.stderr
    assert "no config.json" in result.stderr  # the reason itself, not just that it failed


def test_an_empty_api_key_file_is_a_usage_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# no key yet\n\n")
    result = run_server(["--model", not_a_model(tmp_path), "--api-key-file", str(keys)])
    assert result.returncode == EXIT_USAGE
    assert "holds no key" in result.stderr


@contextlib.contextmanager
def waiting_server(tmp_path: Path, args: list[str], env: dict[str, str]) -> Iterator[ServerProcess]:
    """A server kept up by ``--wait-for-model`` over a folder that is no model, once ``/health`` answers."""
    server = ServerProcess(["--model", not_a_model(tmp_path), "--wait-for-model", *args], tmp_path / "server.log", env)

    def healthy() -> bool:
        assert server.process.poll() is None, server.log()[-4000:]
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        return False

    try:
        wait_until(healthy, EXIT_DEADLINE_S, "the server to listen")
        yield server
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
        server.stop()


@pytest.mark.parametrize("from_env", [False, True], ids=["option", "environment"])
def test_api_key_file_accepts_each_key_and_never_shows_them(tmp_path: Path, from_env: bool) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"# rotation: the old key, then the new one\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    args = ["--log-level", "trace"]
    env = {"OMP_NUM_THREADS": "1"}
    if from_env:
        env["AMULET_API_KEY_FILE"] = str(keys)
    else:
        args += ["--api-key-file", str(keys)]
    with waiting_server(tmp_path, args, env) as server:
        wait_until(lambda: "The model failed to load" in server.log(), EXIT_DEADLINE_S, "the load to fail")
        ready = httpx.get(f"{server.url}/ready", timeout=60)
        assert ready.status_code == 503 and server.process.poll() is None  # stays up, not ready
        answers = [ready, httpx.get(f"{server.url}/metrics", timeout=60)]
        for key in KEYS:
            answer = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert answer.status_code == 200, answer.text
            answers.append(answer)
        for headers in ({"Authorization": f"Bearer {OTHER_KEY}"}, {"Authorization": f"Bearer {KEYS[0]}x"}, {}):
            answer = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=60)
            assert answer.status_code == 401
            answers.append(answer)
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEYS[1]}"})
        assert refused.status_code == 503  # authenticated, but no model
        answers.append(refused)
        for answer in answers:
            assert_no_leak(answer, *KEYS, OTHER_KEY)
    assert server.process.returncode == 0  # SIGTERM: a normal shutdown
    log = server.log()
    assert "ASGI" in log  # trace logging was on
    assert not any(key in log for key in (*KEYS, OTHER_KEY))
