"""The playground's HTTP side, without a browser: what is served where, with which headers, and when not.

The page itself is driven in a real browser by tests/server/test_playground_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest

from amulet_core.method.preference_prompts import PRESETS, Placement
from server.app import create_app
from server.config import ServerConfig
from server.options import parse_args
from server.playground import CONTENT_SECURITY_POLICY
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY, USER
from tests.support.live_server import live_server


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with live_server(create_app(FakeEngine(), ServerConfig(api_key=API_KEY))) as server:
        yield server.url


class _Page(HTMLParser):
    """Collects what the CSP and the accessibility checks need from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.inline_handlers: list[str] = []
        self.style_attributes = 0
        self.style_elements = 0
        self.options: dict[str, list[str]] = {}
        """The option values of each datalist and select, by its id."""
        self._options_of: str | None = None
        self.ids: set[str] = set()
        self.label_targets: set[str] = set()
        self.controls: list[dict[str, str | None]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.inline_handlers += [name for name in named if name.startswith("on")]
        self.style_attributes += "style" in named
        if named.get("id"):
            self.ids.add(str(named["id"]))
        if tag == "script":
            self.scripts.append(named)
            self._in_script = True
        elif tag == "style":
            self.style_elements += 1
        elif tag in ("datalist", "select"):
            self._options_of = str(named.get("id"))
            self.options[self._options_of] = []
        elif tag == "option" and self._options_of is not None:
            self.options[self._options_of].append(named.get("value") or "")
        elif tag == "label" and named.get("for"):
            self.label_targets.add(str(named["for"]))
        if tag in ("input", "textarea", "select"):
            self.controls.append(named)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        elif tag in ("datalist", "select"):
            self._options_of = None

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


def test_root_redirects_to_the_playground(url: str) -> None:
    answer = httpx.get(f"{url}/")
    assert answer.status_code == 307
    assert answer.headers["location"] == "/playground"


def test_the_page_is_served_without_a_key_with_a_strict_policy(url: str) -> None:
    page = httpx.get(f"{url}/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    # ... while its API calls need the key
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_the_page_obeys_its_own_policy(url: str) -> None:
    """No inline script, handler or style that the policy would block; every asset it names is served."""
    html = httpx.get(f"{url}/playground").text
    page = _Page()
    page.feed(html)
    assert not page.inline_script and not page.inline_handlers
    assert page.style_attributes == 0 and page.style_elements == 0
    sources = [script["src"] for script in page.scripts]
    assert sources == ["/playground/playground.js"]
    stylesheets = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
    assert stylesheets == ["/playground/playground.css"]
    for asset, media in (("/playground/playground.js", "text/javascript"), ("/playground/playground.css", "text/css")):
        answer = httpx.get(f"{url}{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(media)
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"https?://", httpx.get(f"{url}/playground/playground.js").text), "nothing from another origin"


def test_the_page_offers_the_presets_and_labels_its_controls(url: str) -> None:
    page = _Page()
    page.feed(httpx.get(f"{url}/playground").text)
    assert sorted(page.options["presets"]) == sorted(PRESETS)
    assert page.options["placement"] == ["", *Placement]  # "" leaves the server's default
    for control in page.controls:
        control_id = control.get("id")
        if control_id is not None:  # controls inside a <label> are labelled by it; the rest need a for=
            assert control_id in page.label_targets or control.get("aria-label"), control
    labelled = {"system", "user", "negative", "placement", "strength", "temperature", "max-tokens", "seed", "api-key"}
    assert labelled <= page.label_targets


@pytest.mark.parametrize(
    "path", ["/playground/../server/app.py", "/playground/app.py", "/playground/playground.html", "/static/x"]
)
def test_only_the_three_files_are_served(url: str, path: str) -> None:
    assert httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404


def test_the_page_is_not_in_the_api_schema(url: str) -> None:
    paths = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()["paths"]
    assert "/playground" not in paths and "/" not in paths


def test_no_playground_turns_it_off() -> None:
    config = parse_args(["--no-playground"]).server
    assert config.playground is False and parse_args([]).server.playground is True
    with live_server(create_app(FakeEngine(), config)) as server:
        assert httpx.get(f"{server.url}/playground").status_code == 404
        assert httpx.get(f"{server.url}/").status_code == 404
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
        assert chat.status_code == 200
