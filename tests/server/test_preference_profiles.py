"""Stored preference profiles (issue 30 item 4): ``/v1/preference_profiles`` CRUD over httpx, a profile named by
``"preference": {"profile": ...}`` on chat (the official openai SDK), completions, responses and messages (the
official anthropic SDK) reaching the engine exactly as the same preference given inline, fields over a profile,
two API keys that cannot see, use or delete each other's profiles, a restart that keeps them (SQLite on disk),
two servers sharing them on PostgreSQL (marked ``system``), and bad input named by its field. Real uvicorn servers
over the fake engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import Placement
from server.app import create_app
from server.config import ServerConfig
from server.store.config import SQLITE_FILE, StoreConfig
from server.store.migrations import MIGRATIONS, migrate, schema_version
from server.store.sqlite import SqliteBackend
from tests.support.fake_engine import FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer, live_server

MODEL = "fake-model"
KEY_A, KEY_B = "sk-profiles-a", "sk-profiles-b"
TERSE = {"text": "Answer in one short sentence.", "method": "la", "coefficient": 2.0, "negative": "Answer at length."}
HI: list[Any] = [{"role": "user", "content": "Hi"}]


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def serve(data_dir: Path | None, engine: FakeEngine | None = None, database_url: str | None = None) -> Any:
    config = ServerConfig(
        api_key=KEY_A,
        extra_api_keys=(KEY_B,),
        preference_placement=Placement.SYSTEM,
        store=StoreConfig(data_dir=None if data_dir is None else str(data_dir), database_url=database_url),
    )
    return live_server(create_app(engine or FakeEngine(max_model_len=4096), config))


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def running(engine: FakeEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("profiles"), engine) as server:
        yield server


@pytest.fixture()
def api(running: LiveServer, engine: FakeEngine) -> Iterator[httpx.Client]:
    """An httpx client of the server (key A by default); every profile of both keys is deleted first."""
    engine.reset()
    with httpx.Client(base_url=f"{running.url}/v1", headers=headers(KEY_A), timeout=30) as client:
        for key in (KEY_A, KEY_B):
            for profile in client.get("/preference_profiles", headers=headers(key)).json()["data"]:
                client.delete(f"/preference_profiles/{profile['id']}", headers=headers(key)).raise_for_status()
        yield client


@pytest.fixture()
def chat_client(running: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY_A, max_retries=0) as client:
        yield client


def create(api: httpx.Client, name: str, preference: Any, key: str = KEY_A) -> dict[str, Any]:
    response = api.post("/preference_profiles", json={"name": name, "preference": preference}, headers=headers(key))
    assert response.status_code == 200, response.text
    return response.json()


def as_decoded(request: GenerationRequest) -> GenerationRequest:
    """What the engine decodes, without the request's own id."""
    return dataclasses.replace(request, request_id="")


def chat(api: httpx.Client, preference: Any, key: str = KEY_A) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": 5, "preference": preference}
    return api.post("/chat/completions", json=body, headers=headers(key))


# ---------------------------------------------------------------- CRUD


def test_create_get_list_patch_delete(api: httpx.Client) -> None:
    made = create(api, "terse", TERSE)
    assert made["id"].startswith("pp_") and made["object"] == "preference_profile"
    assert (made["name"], made["preference"]) == ("terse", TERSE)
    assert made["created_at"] == made["updated_at"] > 0
    by_name, by_id = api.get("/preference_profiles/terse").json(), api.get(f"/preference_profiles/{made['id']}").json()
    assert by_name == by_id == made
    other = create(api, "kind", ["be kind", {"text": "be brief", "weight": 2.0}])
    listing = api.get("/preference_profiles").json()
    assert listing["object"] == "list" and [p["name"] for p in listing["data"]] == ["terse", "kind"]
    assert (listing["first_id"], listing["last_id"], listing["has_more"]) == (made["id"], other["id"], False)

    patched = api.patch("/preference_profiles/terse", json={"preference": {"coefficient": 3.0, "negative": None}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["preference"] == {"text": TERSE["text"], "method": "la", "coefficient": 3.0}
    renamed = api.patch(f"/preference_profiles/{made['id']}", json={"name": "short"}).json()
    assert renamed["name"] == "short" and renamed["preference"]["coefficient"] == 3.0
    assert_openai_error(api.get("/preference_profiles/terse"), 404)
    replaced = api.patch("/preference_profiles/short", json={"preference": "be terse"}).json()
    assert replaced["preference"] == "be terse" and replaced["id"] == made["id"]

    deleted = api.delete("/preference_profiles/short")
    assert deleted.json() == {"id": made["id"], "object": "preference_profile.deleted", "deleted": True}
    assert_openai_error(api.get(f"/preference_profiles/{made['id']}"), 404)
    assert_openai_error(api.delete("/preference_profiles/short"), 404)
    assert [p["name"] for p in api.get("/preference_profiles").json()["data"]] == ["kind"]


def test_a_duplicate_name_is_409(api: httpx.Client) -> None:
    create(api, "terse", "be terse")
    error = assert_openai_error(api.post("/preference_profiles", json={"name": "terse", "preference": "x"}), 409)
    assert (error["param"], error["code"]) == ("name", "profile_name_taken")
    create(api, "other", "x")
    error = assert_openai_error(api.patch("/preference_profiles/other", json={"name": "terse"}), 409)
    assert error["param"] == "name"
    create(api, "terse", "another key may use the name", key=KEY_B)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "p", "preference": {"text": "x", "coefficient": "high"}}, "preference.coefficient"),
        ({"name": "p", "preference": {"text": "x", "strength": 3}}, "preference.strength"),
        ({"name": "p", "preference": {"text": "x", "method": "pref", "negative": "y"}}, "preference.negative"),
        ({"name": "p", "preference": {"text": ["a", "b"], "weights": [1.0, -1.0]}}, "preference.weights[1]"),
        ({"name": "p", "preference": {"text": "x", "lambda": -5.0}}, "preference.lambda"),
        ({"name": "p", "preference": {"method": "la"}}, "preference.text"),
        ({"name": "p", "preference": {"profile": "q", "text": "x"}}, "preference.profile"),
        ({"name": "p", "preference": []}, "preference"),
        ({"name": "p"}, "preference"),
        ({"name": "a b", "preference": "x"}, "name"),
        ({"name": "pp_looks_like_an_id", "preference": "x"}, "name"),
        ({"name": "x" * 65, "preference": "x"}, "name"),
        ({"name": "p", "preference": "x", "colour": "red"}, "colour"),
    ],
)
def test_bad_input_names_its_field(api: httpx.Client, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(api.post("/preference_profiles", json=body), 400)
    assert error["param"] == param, error
    assert api.get("/preference_profiles").json()["data"] == []


def test_a_bad_patch_names_its_field_and_changes_nothing(api: httpx.Client) -> None:
    made = create(api, "terse", TERSE)
    for body, param in (
        ({"preference": {"method": "pref"}}, "preference.negative"),  # the merged profile is checked again
        ({"preference": {"text": None}}, "preference.text"),
        ({"preference": None}, "preference"),
        ({"name": "no/slash"}, "name"),
    ):
        error = assert_openai_error(api.patch("/preference_profiles/terse", json=body), 400)
        assert error["param"] == param, error
    assert api.get("/preference_profiles/terse").json() == made


# ---------------------------------------------------------------- use


def test_a_profile_on_chat_reaches_the_engine_as_the_same_preference_inline(
    api: httpx.Client, chat_client: openai.OpenAI, engine: FakeEngine
) -> None:
    create(api, "terse", TERSE)
    inline = chat_client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, extra_body={"preference": TERSE})
    named = chat_client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=5, extra_body={"preference": {"profile": "terse"}}
    )
    first, second = engine.requests
    assert first.contrast_prompt_ids is not None and "Answer in one short sentence." in "".join(map(chr, first.prompt_ids))
    assert as_decoded(second) == as_decoded(first)
    assert named.choices[0].message.content == inline.choices[0].message.content
    assert named.model_extra and inline.model_extra
    assert named.model_extra["preference"] == inline.model_extra["preference"]


def test_a_string_or_list_profile_is_the_same_string_or_list_inline(api: httpx.Client, engine: FakeEngine) -> None:
    for name, preference in (("s", "be terse"), ("l", ["be terse", {"text": "be kind", "weight": 3.0}])):
        create(api, name, preference)
        engine.reset()
        assert chat(api, preference).status_code == 200
        assert chat(api, {"profile": name}).status_code == 200
        assert as_decoded(engine.requests[1]) == as_decoded(engine.requests[0])


def test_fields_given_with_the_profile_override_its_own(api: httpx.Client, engine: FakeEngine) -> None:
    create(api, "terse", TERSE)
    override = {"coefficient": 5.0, "negative": "Ramble."}
    assert chat(api, {**TERSE, **override}).status_code == 200
    assert chat(api, {"profile": "terse", **override}).status_code == 200
    assert chat(api, TERSE).status_code == 200
    inline, named, plain = engine.requests
    assert as_decoded(named) == as_decoded(inline)
    assert named.method.strength == 5.0 and as_decoded(named) != as_decoded(plain)
    echo = chat(api, {"profile": "terse", "coefficient": 5.0}).json()["preference"]
    assert echo["method"] == "la" and echo["coefficient"] == 5.0
    assert api.get("/preference_profiles/terse").json()["preference"] == TERSE  # the profile is unchanged


def test_an_unknown_profile_is_a_400_naming_preference_profile(api: httpx.Client, engine: FakeEngine) -> None:
    error = assert_openai_error(chat(api, {"profile": "nobody"}), 400)
    assert (error["param"], error["code"]) == ("preference.profile", "preference_profile_not_found")
    assert "nobody" in error["message"]
    assert engine.requests == []


def test_an_override_is_checked_as_a_request_preference(api: httpx.Client) -> None:
    create(api, "terse", TERSE)
    error = assert_openai_error(chat(api, {"profile": "terse", "method": "pref"}), 400)
    assert error["param"] == "preference.negative"  # pref decodes no contrast context
    error = assert_openai_error(chat(api, {"profile": "terse", "coefficient": "high"}), 400)
    assert error["param"] == "preference.coefficient"


def test_a_profile_on_text_completions_is_the_preference_inline(api: httpx.Client, engine: FakeEngine) -> None:
    """A raw prompt refuses any preference; a profile resolves first, then meets the same refusal."""
    create(api, "terse", TERSE)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    inline = assert_openai_error(api.post("/completions", json={**body, "preference": TERSE}), 400)
    named = assert_openai_error(api.post("/completions", json={**body, "preference": {"profile": "terse"}}), 400)
    assert named == inline and named["param"] == "preference"
    unknown = assert_openai_error(api.post("/completions", json={**body, "preference": {"profile": "nobody"}}), 400)
    assert unknown["param"] == "preference.profile"
    assert engine.requests == []


def test_a_profile_on_responses(api: httpx.Client, chat_client: openai.OpenAI, engine: FakeEngine) -> None:
    create(api, "terse", TERSE)
    inline = chat_client.responses.create(model=MODEL, input="Hi", store=False, extra_body={"preference": TERSE})
    named = chat_client.responses.create(model=MODEL, input="Hi", store=False, extra_body={"preference": {"profile": "terse"}})
    assert as_decoded(engine.requests[1]) == as_decoded(engine.requests[0])
    assert named.output_text == inline.output_text
    with pytest.raises(openai.BadRequestError) as refused:
        chat_client.responses.create(model=MODEL, input="Hi", extra_body={"preference": {"profile": "nobody"}})
    assert refused.value.body["param"] == "preference.profile"  # type: ignore[index]


def test_a_profile_on_anthropic_messages(api: httpx.Client, running: LiveServer, engine: FakeEngine) -> None:
    create(api, "terse", TERSE)
    with anthropic.Anthropic(base_url=running.url, api_key=KEY_A, max_retries=0) as client:
        inline = client.messages.create(model=MODEL, max_tokens=5, messages=HI, extra_body={"preference": TERSE})
        named = client.messages.create(model=MODEL, max_tokens=5, messages=HI, extra_body={"preference": {"profile": "terse"}})
        assert as_decoded(engine.requests[1]) == as_decoded(engine.requests[0])
        assert named.content == inline.content
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model=MODEL, max_tokens=5, messages=HI, extra_body={"preference": {"profile": "nobody"}})
    body = refused.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "nobody" in body["error"]["message"]


# ---------------------------------------------------------------- owners and restarts


def test_one_key_cannot_see_use_change_or_delete_another_keys_profile(api: httpx.Client, engine: FakeEngine) -> None:
    made = create(api, "terse", TERSE)
    as_b = headers(KEY_B)
    assert api.get("/preference_profiles", headers=as_b).json()["data"] == []
    for ref in ("terse", made["id"]):
        assert_openai_error(api.get(f"/preference_profiles/{ref}", headers=as_b), 404)
        assert_openai_error(api.patch(f"/preference_profiles/{ref}", json={"name": "mine"}, headers=as_b), 404)
        assert_openai_error(api.delete(f"/preference_profiles/{ref}", headers=as_b), 404)
        assert assert_openai_error(chat(api, {"profile": ref}, key=KEY_B), 400)["param"] == "preference.profile"
    assert engine.requests == []
    assert api.get("/preference_profiles/terse").json() == made  # untouched
    theirs = create(api, "terse", "be verbose", key=KEY_B)  # B's own "terse" is B's alone
    assert chat(api, {"profile": "terse"}, key=KEY_B).status_code == 200
    assert chat(api, {"profile": "terse"}).status_code == 200
    b_request, a_request = engine.requests
    assert "be verbose" in "".join(map(chr, b_request.prompt_ids))
    assert "Answer in one short sentence." in "".join(map(chr, a_request.prompt_ids))
    assert theirs["id"] != made["id"]


def test_profiles_need_the_api_key(running: LiveServer) -> None:
    response = httpx.get(f"{running.url}/v1/preference_profiles", timeout=30)
    assert_openai_error(response, 401)


def test_a_restart_keeps_the_profiles(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        response = httpx.post(
            f"{server.url}/v1/preference_profiles",
            json={"name": "terse", "preference": TERSE},
            headers=headers(KEY_A),
            timeout=30,
        )
        made = response.json()
    engine = FakeEngine(max_model_len=4096)
    with serve(tmp_path, engine) as server:
        kept = httpx.get(f"{server.url}/v1/preference_profiles/terse", headers=headers(KEY_A), timeout=30)
        assert kept.json() == made
        body = {"model": MODEL, "messages": HI, "max_tokens": 5, "preference": {"profile": made["id"]}}
        used = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers(KEY_A), timeout=30)
        assert used.status_code == 200, used.text
        assert engine.requests[0].method.strength == 2.0


def test_a_database_of_schema_1_gains_the_profiles_at_start(tmp_path: Path) -> None:
    older = SqliteBackend(str(tmp_path / SQLITE_FILE))
    assert migrate(older, 0.0, MIGRATIONS[:1]) == [1]  # as the previous version left it
    older.close()
    with serve(tmp_path) as server:
        made = httpx.post(
            f"{server.url}/v1/preference_profiles", json={"name": "terse", "preference": "x"}, headers=headers(KEY_A), timeout=30
        )
        assert made.status_code == 200, made.text
    upgraded = SqliteBackend(str(tmp_path / SQLITE_FILE))
    try:
        assert schema_version(upgraded) == 2
    finally:
        upgraded.close()


@pytest.mark.system
def test_two_servers_share_the_profiles_on_postgres(postgres_url: str) -> None:
    engine = FakeEngine(max_model_len=4096)
    with (
        serve(None, database_url=postgres_url) as one,
        serve(None, engine, database_url=postgres_url) as two,
        httpx.Client(headers=headers(KEY_A), timeout=30) as client,
    ):
        made = client.post(f"{one.url}/v1/preference_profiles", json={"name": "terse", "preference": TERSE}).json()
        assert client.get(f"{two.url}/v1/preference_profiles/terse").json() == made
        again = client.post(f"{two.url}/v1/preference_profiles", json={"name": "terse", "preference": "x"})
        assert assert_openai_error(again, 409)["param"] == "name"
        patched = client.patch(f"{two.url}/v1/preference_profiles/terse", json={"preference": {"coefficient": 3.0}})
        assert patched.status_code == 200, patched.text
        body = {"model": MODEL, "messages": HI, "max_tokens": 5, "preference": {"profile": made["id"]}}
        assert client.post(f"{two.url}/v1/chat/completions", json=body).status_code == 200
        assert engine.requests[0].method.strength == 3.0
        other = client.get(f"{one.url}/v1/preference_profiles", headers=headers(KEY_B)).json()
        assert other["data"] == []
        assert client.delete(f"{one.url}/v1/preference_profiles/terse").status_code == 200
        assert_openai_error(client.get(f"{two.url}/v1/preference_profiles/terse"), 404)
