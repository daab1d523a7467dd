"""The real engine (embedded SmolLM2, float32) behind a real server: HTTP answers equal direct engine calls.

One server (and one model load) serves the whole module. Greedy decoding (temperature 0) makes
the comparison exact: the HTTP layer must hand the engine exactly the request built here by hand
from the documented rules (preference_message_pair, encode_chat, MethodSettings defaults).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import TEMPLATE, Placement, preference_message_pair, resolve_default_system_prompt
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig
from amulet_core.sampling.params import SamplingParams
from server.app import create_app
from server.assembly import engine_lifespan
from server.config import ServerConfig
from tests.support import ROOT
from tests.support.http import API_KEY
from tests.support.live_server import LiveServer, free_port, live_server, wait_ready, wait_until

pytestmark = pytest.mark.smollm

MAX_MODEL_LEN = 1024
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Give me one tip for learning a new language."}]


@pytest.fixture(scope="module")
def engine_server(smollm: LoadedModel) -> Iterator[tuple[LiveServer, AsyncEngine]]:
    """The real engine over the session's SmolLM2 (float32; loading it again took seconds: the CLI test loads its own)."""
    engine = AsyncEngine(
        ModelConfig(dtype="float32", cpu_threads=1, model_cache=default_model_cache()),  # the clients share the cores
        EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=4, kv_cache_tokens=4096),
        loader=lambda _: smollm,
    )
    # The contexts below are built with the system placement, so the server is set to it.
    app = create_app(
        engine, ServerConfig(preference_placement=Placement.SYSTEM), lifespan=engine_lifespan(engine, drain_timeout_s=5)
    )
    with live_server(app) as server:
        wait_ready(server.url)
        yield server, engine


@pytest.fixture(scope="module")
def client(engine_server: tuple[LiveServer, AsyncEngine]) -> Iterator[openai.OpenAI]:
    server, _ = engine_server
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600) as c:
        yield c


def direct(server: LiveServer, engine: AsyncEngine, settings: MethodSettings | None, preference: str | None) -> str:
    """The engine's greedy answer to MESSAGES, called directly (on the server's event loop)."""
    if settings is None:
        contexts = [MESSAGES]
        settings = MethodSettings(method=Method.BASE)
    else:
        # The server's default for conversations without a system message: the chat template's own.
        default_system = resolve_default_system_prompt(TEMPLATE, engine.renderer.template_system_prompt())
        pair = preference_message_pair(MESSAGES, preference or "", default_system)
        contexts = {Method.BASE: [pair.contrast], Method.PREF: [pair.pref]}.get(settings.method, [pair.pref, pair.contrast])
    ids = [engine.renderer.encode_chat(c) for c in contexts]
    request = GenerationRequest(
        request_id=f"direct-{uuid.uuid4().hex}",
        prompt_ids=ids[0],
        contrast_prompt_ids=ids[1] if len(ids) == 2 else None,
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        method=settings,
    )

    async def run() -> str:
        return "".join([out.text async for out in engine.generate(request)])

    return server.run(run)


def ask(client: openai.OpenAI, extra: dict[str, Any] | None, stream: bool = False) -> tuple[str, Any]:
    kwargs: dict[str, Any] = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": extra}
    if not stream:
        response = client.chat.completions.create(model="", **kwargs)
        return response.choices[0].message.content or "", response
    chunks = list(client.chat.completions.create(model="", stream=True, stream_options={"include_usage": True}, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_amulet_preference_matches_the_engine(engine_server: tuple[LiveServer, AsyncEngine], client: openai.OpenAI) -> None:
    server, engine = engine_server
    expected = direct(server, engine, MethodSettings(), "concise")
    text, response = ask(client, {"preference": "concise"})
    assert text == expected
    assert text.strip()
    assert (response.model_extra or {})["preference"]["method"] == "amulet"
    default_system = resolve_default_system_prompt(TEMPLATE, engine.renderer.template_system_prompt())
    pair = preference_message_pair(MESSAGES, "concise", default_system)
    assert (response.model_extra or {})["preference"]["system_prompt"] == default_system != ""
    assert response.usage.prompt_tokens == len(engine.renderer.encode_chat(pair.pref))
    assert (response.usage.model_extra or {})["base_prompt_tokens"] == len(engine.renderer.encode_chat(pair.contrast))
    streamed, chunks = ask(client, {"preference": "concise"}, stream=True)
    assert streamed == expected
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


@pytest.mark.parametrize(
    ("spec", "settings"),
    [
        ({"method": "la", "ratio": 1.5}, MethodSettings(method=Method.LA, ratio=1.5)),
        ({"method": "pref"}, MethodSettings(method=Method.PREF)),
    ],
)
def test_preference_methods_match_the_engine(
    engine_server: tuple[LiveServer, AsyncEngine],
    client: openai.OpenAI,
    spec: dict[str, Any],
    settings: MethodSettings,
) -> None:
    server, engine = engine_server
    text = "Answer in a very formal tone."
    expected = direct(server, engine, settings, text)
    assert ask(client, {"preference": {"text": text, **spec}})[0] == expected


def test_no_preference_is_plain_decoding(engine_server: tuple[LiveServer, AsyncEngine], client: openai.OpenAI) -> None:
    server, engine = engine_server
    expected = direct(server, engine, None, None)
    text, response = ask(client, None)
    assert text == expected
    assert response.usage.prompt_tokens == len(engine.renderer.encode_chat(MESSAGES))


def test_models_and_context_limit(engine_server: tuple[LiveServer, AsyncEngine], client: openai.OpenAI) -> None:
    server, engine = engine_server
    assert [m.id for m in client.models.list().data] == [engine.model_name]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=engine.model_name, messages=MESSAGES, max_tokens=MAX_MODEL_LEN)
    assert (error.value.body or {}).get("code") == "context_length_exceeded"


def test_cli_serves_the_model(tmp_path: Path) -> None:
    """``amulet-server`` (server.cli:main): /health at once, /ready once loaded, a greedy answer, clean exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    env = {**os.environ, "AMULET_API_KEY": API_KEY}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
            "--log-level",
            "warning",
            "--drain-timeout",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError((tmp_path / "server.log").read_text())
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=120, what="/health")
        wait_ready(url)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "preference": "concise"}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        assert "amulet_requests" in httpx.get(f"{url}/metrics").text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
    assert code == 0, (tmp_path / "server.log").read_text()
    assert API_KEY not in (tmp_path / "server.log").read_text()
