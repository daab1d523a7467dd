"""Behind Ray Serve's real proxy, under a route prefix other than ``/``, with an API key: the ingress refuses
every call without the key before forwarding it (open routes excepted) and a body not declared JSON, and a call
with the key is served: all matched on the routed path (Ray's proxy sets ``root_path`` to the prefix and keeps
it in ``path``). Draining under a prefix is checked in-process (tests/ray/test_forwarding.py).

One replica of the tiny random model (it loads in a second); the answers' text does not matter here. About a
minute on the 2-core build machine, most of it Ray starting.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("ray")

from tests.ray.cluster import ServeApp, serve_application  # noqa: E402
from tests.support.http import API_KEY, WRONG_KEY, assert_openai_error  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")]

PREFIX = "/amulet"
GOOD = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def prefixed(tiny_model_folder: str) -> Iterator[ServeApp]:
    argv = ["--model", tiny_model_folder, "--dtype", "float32", "--cpu-threads", "1", "--ray-routing", "pow2"]
    with serve_application(argv, route_prefix=PREFIX, environ={"AMULET_API_KEY": API_KEY}) as app:
        yield app


def test_under_a_route_prefix_every_call_but_the_open_ones_needs_the_key(prefixed: ServeApp) -> None:
    url = prefixed.url
    assert url.endswith(PREFIX)
    for response in (
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=120),
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=120),
        httpx.get(f"{url}/v1/models", timeout=120),
        httpx.get(f"{url}/version", timeout=120),
    ):
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        assert "x-amulet-replica" not in response.headers  # answered by the ingress: never forwarded
    assert httpx.get(f"{url}/health", timeout=120).status_code == 200
    answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=GOOD, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-amulet-replica"] and answer.json()["usage"]["completion_tokens"] >= 1
    plain = httpx.post(f"{url}/v1/chat/completions", content=b"{}", headers=GOOD | {"Content-Type": "text/plain"}, timeout=120)
    assert assert_openai_error(plain, 415)["code"] == "unsupported_media_type"
