"""The preference's modes, strength and default system prompt through HTTP, over the fake engine."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from amulet_core.method.preference_prompts import NEUTRAL_SYSTEM_PROMPT, PAPER_SYSTEM_PROMPT, Placement, preference_message_pair
from amulet_core.method.settings import Method, MethodSettings, Mode
from server.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """These tests check the contexts of the system placement (the end placement's are in test_preference_placement.py)."""
    return ServerConfig(preference_placement=Placement.SYSTEM)


USER_ONLY = [{"role": "user", "content": "How do I keep basil alive?"}]


def post(server: LiveServer, preference: Any, messages: list[dict[str, str]] = USER_ONLY) -> httpx.Response:
    body = {"messages": messages, "preference": preference, "max_tokens": 4}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def test_a_user_message_alone_gets_the_template_system_prompt_in_both_contexts(server: LiveServer, fake: FakeEngine) -> None:
    response = post(server, "concise")
    assert response.status_code == 200, response.text
    echo = response.json()["preference"]
    # The fake model's template has no default of its own, so the neutral sentence stands in.
    assert echo["system_prompt"] == NEUTRAL_SYSTEM_PROMPT
    assert echo["mode"] == "default" and echo["plausibility"] == 0.5
    pair = preference_message_pair(USER_ONLY, "concise", NEUTRAL_SYSTEM_PROMPT)
    request = fake.requests[-1]
    assert request.prompt_ids == fake.encode_chat(pair.pref) and request.contrast_prompt_ids == fake.encode_chat(pair.contrast)


def test_the_conversations_own_system_prompt_is_echoed(server: LiveServer) -> None:
    messages = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, *USER_ONLY]
    echo = post(server, "formal", messages).json()["preference"]
    assert echo["system_prompt"] == PAPER_SYSTEM_PROMPT


def test_paper_mode_is_the_papers_settings(server: LiveServer, fake: FakeEngine) -> None:
    response = post(server, {"text": "concise", "mode": "paper"})
    assert response.status_code == 200, response.text
    assert fake.requests[-1].method == MethodSettings.paper()
    echo = response.json()["preference"]
    assert echo["mode"] == "paper" and echo["plausibility"] == 0.0
    assert echo["coefficient"] == pytest.approx(5.6487, abs=1e-4)


def test_a_set_coefficient_is_the_strength(server: LiveServer, fake: FakeEngine) -> None:
    response = post(server, {"text": "concise", "method": "la", "coefficient": 2.5, "mode": "paper"})
    assert response.status_code == 200, response.text
    method = fake.requests[-1].method
    assert (method.method, method.strength, method.effective_strength, method.mode) == (Method.LA, 2.5, 2.5, Mode.PAPER)
    assert response.json()["preference"]["coefficient"] == 2.5


@pytest.mark.parametrize(
    ("preference", "param", "says"),
    [
        ({"text": "concise", "coefficient": 3, "iterations": 10}, "preference.coefficient", "'iterations'"),
        ({"text": "concise", "coefficient": 3, "lambda": 1, "eta": 2}, "preference.coefficient", "'lambda'"),
        ({"text": "concise", "method": "la", "coefficient": 3, "ratio": 1}, "preference.coefficient", "'ratio'"),
        ({"text": "concise", "coefficient": -1}, "preference.coefficient", "from 0"),
        ({"text": "concise", "coefficient": 1e40}, "preference.coefficient", "from 0"),
        ({"text": "concise", "plausibility": 1.0}, "preference.plausibility", "[0, 1)"),
        ({"text": "concise", "mode": "fast"}, "preference.mode", None),
    ],
)
def test_bad_settings_are_a_400_naming_the_field(server: LiveServer, preference: dict, param: str, says: str | None) -> None:
    error = assert_openai_error(post(server, preference), 400)
    assert error["param"] == param, error
    if says is not None:
        assert says in error["message"]
    assert post(server, "concise").status_code == 200  # and the server keeps serving
