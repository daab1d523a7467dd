"""The playground in a real browser: Debian's headless Chromium driven by Playwright, against a real server.

The server is the real app over the real engine and the embedded SmolLM2 (float32), with an API key and
Prometheus metrics, on 127.0.0.1. Chromium comes from Debian's ``chromium`` package
(``tests/tools/ensure_debian_package.sh`` installs it when missing; the tests skip only where it cannot be
installed); Playwright drives it through ``executable_path`` and downloads nothing. The page's strict CSP
stays on (no ``bypass_csp``), so these tests also prove the page works under it.

``AMULET_UPDATE_SCREENSHOT=1`` saves the mid-stream screenshot to docs/playground.png (README's picture).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from server.config import ServerConfig
from tests.support import ROOT
from tests.support.browser import watched_page
from tests.support.http import API_KEY, WRONG_KEY
from tests.support.live_server import EngineServer, engine_server, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.smollm]

SCREENSHOT = ROOT / "docs" / "playground.png"
QUESTION = "How do I keep basil alive?"
ANSWER_TIMEOUT_MS = 300_000
"""Generous: two 48-token answers take seconds on a quiet machine, CI machines are busy."""


@pytest.fixture(scope="module")
def running(smollm: Any) -> Iterator[EngineServer]:
    engine_config = EngineConfig(max_num_seqs=16, kv_cache_tokens=8192)
    with engine_server(smollm, engine_config, server_config=ServerConfig(api_key=API_KEY), with_metrics=True) as server:
        yield server


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, running: EngineServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=running.url)
    try:
        with watched_page(context.new_page(), f"{running.url}/") as opened:
            yield opened
    finally:
        context.close()


def _sign_in(page: Any, key: str = API_KEY) -> None:
    page.fill("#api-key", key)
    page.locator("#api-key").dispatch_event("change")
    if key == API_KEY:
        expect(page.locator("#status")).to_have_text(re.compile("^Model: "))


def _column(page: Any, method: str) -> Any:
    return page.locator(f".column[data-method={method}]")


def _wait_finished(page: Any, methods: tuple[str, ...]) -> None:
    for method in methods:
        expect(_column(page, method)).to_have_attribute("data-state", re.compile("done|error|stopped"), timeout=ANSWER_TIMEOUT_MS)


def _api_answer(url: str, body: dict[str, Any]) -> str:
    plain = {**body, "stream": False}
    plain.pop("stream_options", None)
    answer = httpx.post(f"{url}/v1/chat/completions", json=plain, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def _streamed_text(sse: str) -> str:
    text = ""
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text += chunk["choices"][0]["delta"]["content"]
    return text


def _copied(page: Any, method: str, kind: str) -> str:
    _column(page, method).locator(f".copy-{kind}").click()
    expect(_column(page, method).locator(f".copy-{kind}")).to_have_text("Copied")
    return str(page.evaluate("navigator.clipboard.readText()"))


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def test_base_and_amulet_stream_the_apis_greedy_answers_and_copy_as_curl_and_python(page: Any, running: EngineServer) -> None:
    _sign_in(page)
    page.fill("#user", QUESTION)
    page.fill("#max-tokens", "48")
    expect(page.locator("#temperature")).to_have_value("0")
    page.locator("#run").click()
    _wait_finished(page, ("base", "amulet"))
    texts = {}
    for method in ("base", "amulet"):
        assert _column(page, method).get_attribute("data-state") == "done", _column(page, method).inner_text()
        texts[method] = _column(page, method).locator(".answer").text_content()
        expect(_column(page, method).locator(".stats")).to_contain_text(re.compile(r"\d+ tokens · first token \d+ ms"))
    expect(_column(page, "amulet").locator(".stats")).to_contain_text("A = 5.6487")
    model = httpx.get(f"{running.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
    request = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 48}
    # Both at once, and below both copied snippets run at once: the engine batches them, each answer the same bits as
    # alone (the CPU engine is batch-invariant).
    amulet_request = {**request, "preference": {"text": "concise", "method": "amulet"}}
    with ThreadPoolExecutor(2) as pool:
        base_answer, amulet_answer = pool.map(functools.partial(_api_answer, running.url), (request, amulet_request))
    assert texts["base"] == base_answer
    assert texts["amulet"] == amulet_answer
    assert texts["base"] != texts["amulet"]

    curl = _copied(page, "amulet", "curl")
    assert curl.startswith(f"curl -sN {running.url}/v1/chat/completions") and API_KEY not in curl
    python = _copied(page, "amulet", "python")
    shell = shutil.which("bash") or "/bin/bash"
    env = {**os.environ, "AMULET_API_KEY": API_KEY}
    with ThreadPoolExecutor(2) as pool:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=300, env=env)
        ran_curl, ran_python = pool.map(run, ([shell, "-c", curl], [sys.executable, "-c", python]))
    assert ran_curl.returncode == 0, ran_curl.stderr
    assert _streamed_text(ran_curl.stdout) == texts["amulet"]
    assert ran_python.returncode == 0, ran_python.stderr
    assert ran_python.stdout.removesuffix("\n") == texts["amulet"]

    # the conversation goes on: each column's request carries its own earlier reply
    page.fill("#user", "And in winter?")
    page.fill("#max-tokens", "8")
    page.locator("#run").click()
    _wait_finished(page, ("base", "amulet"))
    follow_up = json.loads(_copied(page, "amulet", "curl").split("-d '", 1)[1].rstrip("'\n"))
    assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
    assert follow_up["messages"][1]["content"] == texts["amulet"]
    expect(_column(page, "base").locator(".turn-reply")).to_have_text(texts["base"])


def test_the_placement_select_adds_the_preference_placement(page: Any, running: EngineServer) -> None:
    _sign_in(page)
    page.fill("#user", QUESTION)
    page.fill("#max-tokens", "4")
    expect(page.locator("#placement")).to_have_value("")  # the server's default: the request leaves it out
    page.select_option("#placement", "end")
    page.locator("#run").click()
    _wait_finished(page, ("base", "amulet"))
    assert _column(page, "amulet").get_attribute("data-state") == "done", _column(page, "amulet").inner_text()
    body = json.loads(_copied(page, "amulet", "curl").split("-d '", 1)[1].rstrip("'\n"))
    assert body["preference"]["placement"] == "end"
    request = {key: body[key] for key in ("model", "messages", "temperature", "max_tokens", "preference")}
    assert _column(page, "amulet").locator(".answer").text_content() == _api_answer(running.url, request)
    page.select_option("#placement", "")
    page.locator("#new-conversation").click()
    page.locator("#run").click()
    _wait_finished(page, ("base", "amulet"))
    body = json.loads(_copied(page, "amulet", "curl").split("-d '", 1)[1].rstrip("'\n"))
    assert "placement" not in body["preference"]


def test_a_wrong_key_shows_the_apis_401_message(page: Any) -> None:
    _sign_in(page, WRONG_KEY)
    expect(page.locator("#status")).to_contain_text("401: Incorrect API key provided.")
    page.fill("#user", QUESTION)
    page.locator("#run").click()
    for method in ("base", "amulet"):
        expect(_column(page, method).locator(".error")).to_have_text("401: Incorrect API key provided.")


def test_stop_aborts_every_stream_and_frees_the_kv_cache(page: Any, running: EngineServer) -> None:
    _sign_in(page)
    for method in ("pref", "la"):
        page.check(f'input[name="column"][value="{method}"]')
    page.fill("#user", "Write a long, detailed essay on the history of gardening, with many examples.")
    page.fill("#max-tokens", "1500")
    page.locator("#run").click()
    methods = ("base", "pref", "la", "amulet")
    for method in methods:
        expect(_column(page, method).locator(".answer")).to_have_text(re.compile(r"\S(.|\n){40}"), timeout=ANSWER_TIMEOUT_MS)
    expect(_column(page, "base").locator(".answer")).to_have_text(re.compile(r"\S(.|\n){300}"), timeout=ANSWER_TIMEOUT_MS)
    shot = page.screenshot(full_page=True)  # mid-stream: the base answer is long, the others may have ended
    if os.environ.get("AMULET_UPDATE_SCREENSHOT") == "1":
        Path(SCREENSHOT).write_bytes(shot)
    page.locator("#stop").click()
    expect(page.locator("#status")).to_have_text("Stopped.")
    states = [_column(page, method).get_attribute("data-state") for method in methods]
    assert "stopped" in states and set(states) <= {"stopped", "done"}, states
    wait_until(lambda: _metric(running.url, "amulet_requests_running") == 0, 120, "the aborted requests to leave the batch")
    wait_until(lambda: _metric(running.url, "amulet_kv_cache_usage_ratio") == 0, 120, "the KV cache to be freed")
    expect(page.locator("#run")).to_be_enabled()


def test_narrow_and_dark(page: Any) -> None:
    """On a phone-sized window the columns stack; the dark scheme changes the colours."""
    page.set_viewport_size({"width": 400, "height": 800})
    page.check('input[name="column"][value="la"]')
    boxes = [_column(page, method).bounding_box() for method in ("base", "la", "amulet")]
    assert len({round(box["x"]) for box in boxes}) == 1 and all(box["width"] <= 400 for box in boxes)
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != light
    page.locator("#user").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") != "user", "Tab moves on from the message box"
