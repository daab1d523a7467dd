"""podman and podman-compose for tests/ops/test_compose_up.py: installed when missing, run with the project's
runtime settings (docker/podman/containers.conf), the compose stack named by one project and its two files."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from tests.support import ENSURE_PACKAGE, ROOT

CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"
BUILD_IMAGES = ROOT / "docker" / "build-images.sh"
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.podman.yml")
PACKAGES = {
    # binary: the Debian packages that bring it (netavark and aardvark-dns: the network whose DNS resolves `server`)
    "podman": ("podman", "runc", "netavark", "aardvark-dns", "iptables", "uidmap"),
    "runc": ("runc",),
    "podman-compose": ("podman-compose",),
    "debootstrap": ("debootstrap",),
}

T = TypeVar("T")


def _with_sbin(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with /usr/sbin and /sbin on PATH (runc and debootstrap live there)."""
    return {**env, "PATH": env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"}


def ensure_tools() -> None:
    """Install podman, runc, podman-compose and debootstrap when missing (skip where apt-get or root is lacking)."""
    if os.geteuid() != 0:
        pytest.skip("the stack runs on rootful podman (as on the project's machines and CI): run as root")
    for binary, packages in PACKAGES.items():
        argv = [str(ENSURE_PACKAGE), binary, *packages]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=_with_sbin(os.environ))
        if result.returncode == 3:
            pytest.skip(result.stderr.strip())
        assert result.returncode == 0, f"installing {binary} failed:\n{result.stderr[-3000:]}"


@dataclass(frozen=True)
class Stack:
    """The compose stack of one project: podman commands with the project's containers.conf and variables."""

    project: str
    api_key: str

    @property
    def env(self) -> dict[str, str]:
        return {
            **_with_sbin(os.environ),
            "CONTAINERS_CONF": str(CONTAINERS_CONF),
            "AMULET_API_KEY": self.api_key,
            # Grafana is not started, but compose still reads its required variable.
            "GRAFANA_ADMIN_PASSWORD": "unused-grafana-is-not-started",
        }

    def run(self, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check:
            assert result.returncode == 0, (
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def podman(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("podman", *args, timeout=timeout, check=check)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        return self.run("podman-compose", "-p", self.project, *files, *args, timeout=timeout)

    def containers(self, service: str | None = None, *, running_only: bool = False) -> list[str]:
        """IDs of the project's containers (of one service), by compose's labels."""
        args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service is not None:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if not running_only:
            args.append("-a")
        return self.podman(*args).stdout.split()

    def inspect(self, container: str) -> dict[str, Any]:
        (state,) = json.loads(self.podman("inspect", container).stdout)
        return state

    def the_container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]


def poll(check: Callable[[], T | None], what: str, deadline_s: float) -> T:
    """Call ``check`` until it returns something truthy; fail after ``deadline_s`` seconds (a generous bound)."""
    deadline = time.monotonic() + deadline_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1.0)
    pytest.fail(f"{what}: not within {deadline_s:.0f} s (last: {last!r})")


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a GET (0 when nothing answers)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def http_post_json(url: str, body: dict[str, Any], api_key: str, timeout: float = 120) -> http.client.HTTPResponse:
    """An open response to a JSON POST with the API key (the caller reads it, streamed or whole)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    return response
