"""The database of stored responses: SQLite on disk (WAL, versioned schema, a restart that keeps a conversation),
retention (``--response-ttl`` and the per-key cap, on an injected clock), a write that fails, the options, and
PostgreSQL from the Debian package shared by two servers (marked ``system``: it may install the package).

The HTTP tests run real uvicorn servers over the fake engine; the SDK's side of the API is test_responses_api.py's.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from server.options import parse_args
from server.store.config import SQLITE_FILE, StoreConfig
from server.store.database import Database, StoreError
from server.store.migrations import MIGRATIONS, schema_version
from server.store.responses import ResponseStore, StoredResponse
from server.store.sqlite import SqliteBackend
from tests.support.fake_engine import REPLY_TEXT, FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer, live_server

MODEL = "fake-model"
KEY_A, KEY_B = "sk-store-a", "sk-store-b"


@dataclass
class Clock:
    """A wall clock the test moves by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def serve(store: StoreConfig, **config: Any) -> Any:
    return live_server(create_app(FakeEngine(), ServerConfig(store=store, **config)))


def ask(server: LiveServer, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body}, headers=headers, timeout=30)


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def get(server: LiveServer, response_id: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.url}/v1/responses/{response_id}", headers=headers, timeout=30)


# ---------------------------------------------------------------- SQLite on disk


def test_sqlite_file_is_created_in_wal_mode_with_its_schema(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    with serve(StoreConfig(data_dir=str(data_dir))):
        path = data_dir / SQLITE_FILE
        assert path.is_file()  # created at start-up, its folder too
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
            assert versions == [m.version for m in MIGRATIONS]
    backend = SqliteBackend(str(data_dir / SQLITE_FILE))
    try:
        assert schema_version(backend) == MIGRATIONS[-1].version  # a second start applies nothing again
    finally:
        backend.close()


def test_a_restart_keeps_the_conversation(tmp_path: Path) -> None:
    store = StoreConfig(data_dir=str(tmp_path))
    with serve(store) as first_server:
        first = created(ask(first_server, input="[say:Paris.:say] Capital of France?"))
    engine = FakeEngine()
    with live_server(create_app(engine, ServerConfig(store=store))) as second_server:
        assert get(second_server, first["id"]).json()["output"] == first["output"]
        second = created(ask(second_server, input="[say:Rome.:say] And Italy?", previous_response_id=first["id"]))
        prompt = "".join(chr(t) for t in engine.requests[-1].prompt_ids)
        assert "Capital of France?\n<|assistant|>Paris.\n<|user|>[say:Rome.:say] And Italy?" in prompt
        assert second["output"][0]["content"][0]["text"] == "Rome."


def test_a_failed_write_fails_the_request_and_loses_nothing(tmp_path: Path) -> None:
    with serve(StoreConfig(data_dir=str(tmp_path))) as server:
        kept = created(ask(server, input="Hi"))
        with sqlite3.connect(tmp_path / SQLITE_FILE) as db:  # the disk is "full" from now on
            db.execute("CREATE TRIGGER full BEFORE INSERT ON responses BEGIN SELECT RAISE(FAIL, 'disk full'); END")
        error = assert_openai_error(ask(server, input="Hi again"), 503)
        assert error["code"] == "store_unavailable" and "disk full" not in error["message"]
        streamed = ask(server, input="Hi again", stream=True)
        kinds = [line.removeprefix("event: ") for line in streamed.text.splitlines() if line.startswith("event: ")]
        assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
        assert "store_unavailable" in streamed.text
        assert created(ask(server, input="Not kept", store=False))["store"] is False  # store: false still answers
        assert get(server, kept["id"]).json()["output"] == kept["output"]  # what was stored is still there
        with sqlite3.connect(tmp_path / SQLITE_FILE) as db:
            db.execute("DROP TRIGGER full")
        assert get(server, created(ask(server, input="Hi"))["id"]).status_code == 200


# ---------------------------------------------------------------- retention, on an injected clock


def test_an_expired_response_is_gone(tmp_path: Path) -> None:
    clock = Clock()
    with serve(StoreConfig(data_dir=str(tmp_path), response_ttl_s=3600, clock=clock)) as server:
        old = created(ask(server, input="Hi"))
        clock.now += 3599
        assert get(server, old["id"]).status_code == 200
        young = created(ask(server, input="Hi"))
        clock.now += 2  # old is 3601 s old, young 2 s
        for call in (
            lambda: get(server, old["id"]),
            lambda: httpx.delete(f"{server.url}/v1/responses/{old['id']}"),
            lambda: ask(server, input="Go on", previous_response_id=old["id"]),
        ):
            assert_openai_error(call(), 404)
        assert get(server, young["id"]).status_code == 200
        created(ask(server, input="Hi"))  # a write deletes the expired rows
    with sqlite3.connect(tmp_path / SQLITE_FILE) as db:
        ids = {row[0] for row in db.execute("SELECT id FROM responses")}
    assert old["id"] not in ids and young["id"] in ids


def test_the_per_key_cap_drops_the_oldest_of_that_key_only() -> None:
    store = StoreConfig(max_responses_per_key=3, clock=Clock())
    with serve(store, api_key=KEY_A, extra_api_keys=(KEY_B,)) as server:
        theirs = created(ask(server, KEY_B, input="Hi"))
        mine = [created(ask(server, KEY_A, input=f"Hi {i}"))["id"] for i in range(5)]
        assert [get(server, i, KEY_A).status_code for i in mine] == [404, 404, 200, 200, 200]
        assert get(server, theirs["id"], KEY_B).status_code == 200


def test_response_store_directly() -> None:
    clock = Clock()
    store = ResponseStore(Database(StoreConfig(response_ttl_s=10, max_responses_per_key=2, clock=clock)))

    async def scenario() -> None:
        record = StoredResponse("resp_1", "tenant-a", clock.now, {"id": "resp_1"}, [{"id": "msg_1"}], [{"id": "msg_1"}])
        await store.save(record)
        assert await store.load("resp_1", "tenant-a") == record
        assert await store.load("resp_1", "tenant-b") is None and await store.load("resp_1", None) is None
        assert not await store.delete("resp_1", "tenant-b")
        with pytest.raises(StoreError):  # ids are unique: a second write of one fails, and changes nothing
            await store.save(record)
        assert await store.count("tenant-a") == 1
        clock.now += 11
        assert await store.load("resp_1", "tenant-a") is None
        assert await store.delete("resp_1", "tenant-a") is False

    try:
        asyncio.run(scenario())
    finally:
        store.database.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    config = StoreConfig(data_dir=str(tmp_path))
    database = Database(config)
    asyncio.run(database.open())
    database.close()
    with sqlite3.connect(tmp_path / SQLITE_FILE) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    newer = Database(config)
    try:
        with pytest.raises(StoreError, match="schema version 999"):
            asyncio.run(newer.open())
    finally:
        newer.close()


# ---------------------------------------------------------------- options


def test_the_options_make_the_store_config(tmp_path: Path) -> None:
    argv = ["--data-dir", str(tmp_path), "--response-ttl", "12h", "--max-stored-responses", "5"]
    store = parse_args(argv).server.store
    assert (store.data_dir, store.response_ttl_s, store.max_responses_per_key, store.backend) == (
        str(tmp_path),
        43200.0,
        5,
        "sqlite",
    )
    assert parse_args(["--response-ttl", "none", "--data-dir", "none"]).server.store.response_ttl_s is None
    assert parse_args(["--data-dir", "none"]).server.store.backend == "memory"
    assert parse_args(["--response-ttl", "90"]).server.store.response_ttl_s == 90.0
    url = parse_args(["--database-url", "postgresql://u@db:5432/amulet"]).server.store
    assert url.backend == "postgresql" and "postgresql" not in repr(url)  # a URL may hold a password
    assert parse_args([], environ={"AMULET_DATA_DIR": str(tmp_path)}).server.store.data_dir == str(tmp_path)
    for bad in (
        ["--response-ttl", "soon"],
        ["--response-ttl", "0"],
        ["--max-stored-responses", "0"],
        ["--database-url", "mysql://x"],
    ):
        with pytest.raises(SystemExit) as exited:
            parse_args(bad)
        assert exited.value.code == 2


# ---------------------------------------------------------------- PostgreSQL, shared by two servers


@pytest.mark.system
def test_two_servers_share_one_postgres_store(postgres_url: str) -> None:
    store = StoreConfig(database_url=postgres_url)
    config = {"api_key": KEY_A, "extra_api_keys": (KEY_B,)}
    engine = FakeEngine()
    with serve(store, **config) as one, live_server(create_app(engine, ServerConfig(store=store, **config))) as two:
        first = created(ask(one, KEY_A, input="[say:Paris.:say] Capital of France?"))
        assert get(two, first["id"], KEY_A).json()["output"] == first["output"]
        second = created(ask(two, KEY_A, input="[say:Rome.:say] And Italy?", previous_response_id=first["id"]))
        prompt = "".join(chr(t) for t in engine.requests[-1].prompt_ids)
        assert "Capital of France?\n<|assistant|>Paris.\n<|user|>" in prompt
        assert get(one, second["id"], KEY_A).json()["previous_response_id"] == first["id"]
        assert get(one, first["id"], KEY_B).status_code == 404  # another key's, on either server
        assert (
            httpx.delete(f"{two.url}/v1/responses/{first['id']}", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        )
        assert get(one, first["id"], KEY_A).status_code == 404
        assert created(ask(one, KEY_A, input="Hi"))["output"][0]["content"][0]["text"] == REPLY_TEXT
    import psycopg

    with psycopg.connect(postgres_url) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m.version for m in MIGRATIONS]  # the two servers migrated it once
