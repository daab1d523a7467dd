"""The Ray image (docker/Dockerfile.ray), built with podman like the server image, serves a request.

``docker/build-images.sh server ray`` builds the CPU server image (from podman's layer cache when
tests/ops/test_compose_up.py ran first) and Ray Serve on top of it; the container then runs ``amulet-ray`` with one
replica behind Ray's proxy, published on a free port of 127.0.0.1, and answers a chat completion with a preference
(with the key; 401 without). About 2 minutes: 40 s to install Ray into the image, about a minute for Ray and the
replica to start on 2 cores. Opt-in, to keep CI short (``AMULET_TEST_RAY_IMAGE=1``): the compose test already builds
and runs the server image, and Ray's own behaviour is tested in tests/ray.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest

from tests.ops.podman_stack import BUILD_IMAGES, Stack, ensure_tools, http_get, http_post_json, poll

pytestmark = [
    pytest.mark.system,
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(os.environ.get("AMULET_TEST_RAY_IMAGE") != "1", reason="opt-in: AMULET_TEST_RAY_IMAGE=1 (2-3 min)"),
]

IMAGE = "localhost/amulet-serve-ray:cpu"
CONTAINER = "amulet-ray-image-test"
API_KEY = "sk-ray-image-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url() -> Iterator[tuple[Stack, str]]:
    ensure_tools()
    podman = Stack("amulet-ray-image-test", API_KEY)
    build = podman.run("bash", str(BUILD_IMAGES), "server", "ray", timeout=3600, check=False)
    assert build.returncode == 0, f"the images did not build:\n{build.stderr[-6000:]}"
    podman.podman("rm", "-f", "-v", CONTAINER, check=False)
    port = _free_port()
    podman.podman(
        "run", "-d", "--name", CONTAINER, "-p", f"127.0.0.1:{port}:8000", "--shm-size=1g",
        "-e", f"AMULET_API_KEY={API_KEY}", IMAGE,
        "amulet-ray", "--host", "0.0.0.0", "--port", "8000", "--ray-replicas", "1", "--cpu-threads", "1",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: http_get(f"{url}/ready")[0] == 200, "the Ray replica ready behind the proxy", 600)
        yield podman, url
    finally:
        logs = podman.podman("logs", "--tail", "30", CONTAINER, check=False)
        print(logs.stdout[-3000:], logs.stderr[-3000:])
        podman.podman("rm", "-f", "-v", CONTAINER, check=False)


def test_the_ray_image_answers_with_one_replica(ray_url: tuple[Stack, str]) -> None:
    podman, url = ray_url
    assert http_get(f"{url}/v1/models")[0] == 401
    body = {
        "messages": [{"role": "user", "content": "Explain photosynthesis."}],
        "preference": {"text": "concise", "method": "amulet"},
        "max_tokens": 16,
    }
    with http_post_json(f"{url}/v1/chat/completions", body, API_KEY, timeout=300) as response:
        assert response.status == 200
        assert response.headers["x-amulet-replica"]
        answer = json.loads(response.read())
    assert answer["choices"][0]["message"]["content"].strip()
    assert podman.podman("exec", CONTAINER, "id", "-u").stdout.strip() == "10001"
