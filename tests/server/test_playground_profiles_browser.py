"""The playground's profile picker in a real browser (Debian's headless Chromium driven by Playwright, as
test_playground_browser.py), against a real server over the fake engine: a stored profile fills the form, the
columns then send its preference, and the form saves as a new profile. The page's strict CSP stays on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from amulet_core.method.preference_prompts import Placement
from server.app import create_app
from server.config import ServerConfig
from server.store.config import StoreConfig
from tests.support.browser import watched_page
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY
from tests.support.live_server import LiveServer, live_server

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser]

STORED = {"text": ["be terse", {"text": "be kind", "weight": 2.0}], "negative": "ramble", "coefficient": 4.0}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def running(engine: FakeEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = StoreConfig(data_dir=str(Path(tmp_path_factory.mktemp("playground-profiles"))))
    config = ServerConfig(api_key=API_KEY, preference_placement=Placement.SYSTEM, store=store)
    with live_server(create_app(engine, config)) as server:
        yield server


@pytest.fixture
def page(chromium_path: str, running: LiveServer) -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path)
        try:
            with watched_page(browser.new_page(viewport={"width": 1400, "height": 900}), f"{running.url}/") as opened:
                yield opened
        finally:
            browser.close()


def test_a_profile_fills_the_form_and_the_form_saves_as_a_profile(page: Any, running: LiveServer, engine: FakeEngine) -> None:
    made = httpx.post(
        f"{running.url}/v1/preference_profiles", json={"name": "kind", "preference": STORED}, headers=AUTH, timeout=30
    )
    assert made.status_code == 200, made.text
    page.fill("#api-key", API_KEY)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#profile option")).to_have_count(2)
    page.select_option("#profile", label="kind")
    expect(page.locator("#status")).to_have_text("Profile kind loaded.")
    assert page.locator(".pref-text").evaluate_all("nodes => nodes.map(n => n.value)") == ["be terse", "be kind"]
    assert page.locator(".pref-weight").evaluate_all("nodes => nodes.map(n => Number(n.value))") == [1, 2]
    assert (page.input_value("#negative"), page.input_value("#strength")) == ("ramble", "4")

    engine.reset()
    page.fill("#user", "Hi")
    page.locator("#run").click()
    for method in ("base", "amulet"):
        expect(page.locator(f".column[data-method={method}]")).to_have_attribute("data-state", "done")
    sent = [r for r in engine.requests if r.contrast_prompt_ids is not None]
    assert len(sent) == 1 and sent[0].method.strength == 4.0
    assert "be kind" in "".join(map(chr, sent[0].extra_prompt_ids[0]))

    page.fill("#strength", "1.5")
    page.fill("#profile-name", "kind-softer")
    page.locator("#save-profile").click()
    expect(page.locator("#status")).to_have_text("Profile kind-softer saved.")
    saved = httpx.get(f"{running.url}/v1/preference_profiles/kind-softer", headers=AUTH, timeout=30).json()
    assert saved["preference"] == {**STORED, "coefficient": 1.5, "weights": [1, 2], "text": ["be terse", "be kind"]}
    assert page.locator("#profile").input_value() == saved["id"]

    page.locator("#save-profile").click()  # the name is taken now
    expect(page.locator("#status")).to_contain_text("409: A preference profile named 'kind-softer' exists already.")
