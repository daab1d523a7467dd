"""``/v1/completions``, ``/tokenize``, ``/detokenize`` and ``/version`` over the fake engine, with the
official ``openai`` client where it has a call for it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.config import ServerConfig
from tests.support.fake_engine import BOS_ID, REPLY_PIECES, REPLY_TEXT, FakeEngine
from tests.support.http import API_KEY, assert_openai_error
from tests.support.live_server import LiveServer

MODEL = "amulet-test"


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(served_model_name=MODEL, api_key=API_KEY)


@pytest.fixture()
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def post(server: LiveServer, path: str, body: dict[str, Any], key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers)


def test_text_completion(client: openai.OpenAI, fake: FakeEngine) -> None:
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, "".join(REPLY_PIECES[:4]), "length")
    request = fake.requests[-1]
    assert request.prompt_ids == (BOS_ID, *(ord(c) for c in "Once upon a time"))  # no chat template
    assert request.method.method.value == "base" and request.contrast_prompt_ids is None
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(request.prompt_ids), 4)


def test_default_max_tokens_is_sixteen(client: openai.OpenAI, fake: FakeEngine) -> None:
    client.completions.create(model=MODEL, prompt="x")
    assert fake.requests[-1].sampling.max_tokens == 16


def test_prompt_forms_and_choice_numbering(client: openai.OpenAI, fake: FakeEngine) -> None:
    response = client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, seed=3, temperature=1, max_tokens=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text[:3] for c in response.choices] == ["[3]", "[4]", "[3]", "[4]"]
    prompts = sorted("".join(chr(i) for i in r.prompt_ids[1:]) for r in fake.requests)
    assert prompts == ["ab", "ab", "cd", "cd"]
    assert response.usage is not None and response.usage.prompt_tokens == 3 + 3  # each prompt once
    fake.reset()
    client.completions.create(model=MODEL, prompt=[72, 105], max_tokens=1)
    assert fake.requests[-1].prompt_ids == (72, 105)
    client.completions.create(model=MODEL, prompt=[[72], [105, 33]], max_tokens=1)
    assert sorted(r.prompt_ids for r in fake.requests[1:]) == [(72,), (105, 33)]


def test_echo_and_logprobs(client: openai.OpenAI, fake: FakeEngine) -> None:
    echoed = client.completions.create(model=MODEL, prompt="Say: ", echo=True, max_tokens=2)
    assert echoed.choices[0].text == "Say: " + "".join(REPLY_PIECES[:2])
    scored = client.completions.create(model=MODEL, prompt="Say: ", logprobs=2, max_tokens=3)
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == list(REPLY_PIECES[:3])
    assert logprobs.token_logprobs == [-0.25] * 3
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset == [0, 5, 6]


def test_streamed_completion_with_usage(client: openai.OpenAI, fake: FakeEngine) -> None:
    stream = client.completions.create(model=MODEL, prompt="Hi", stream=True, stream_options={"include_usage": True}, echo=True)
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Hi" + REPLY_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(REPLY_PIECES)


def test_streamed_completion_events(server: LiveServer, fake: FakeEngine) -> None:
    body = {"prompt": "Hi", "stream": True, "max_tokens": 2, "n": 2}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)
    by_index: dict[int, str] = {0: "", 1: ""}
    for chunk in chunks:
        by_index[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert by_index == {0: "Hello,", 1: "Hello,"}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "preference": "concise"}, "preference"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [0x110000]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "add_special_tokens": False, "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "presence_penalty": -2.5}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"x1": 2}}, "logit_bias"),
    ({"prompt": "x", "model": "gpt-3.5-turbo-instruct"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[str(b)[:50] for b, _ in BAD])
def test_bad_completion_requests_name_the_field(server: LiveServer, fake: FakeEngine, body: dict[str, Any], param: str) -> None:
    response = post(server, "/v1/completions", {**body, "add_special_tokens": body.get("add_special_tokens", False)})
    error = assert_openai_error(response)
    assert error["param"] == param
    assert fake.requests == []
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_tokenize_and_detokenize(server: LiveServer, fake: FakeEngine) -> None:
    prompt = post(server, "/tokenize", {"prompt": "Hi!", "return_token_strs": True}).json()
    assert prompt == {
        "count": 4,
        "max_model_len": fake.max_model_len,
        "tokens": [BOS_ID, 72, 105, 33],
        "token_strs": ["<2>", "<72>", "<105>", "<33>"],
    }
    assert post(server, "/tokenize", {"prompt": "Hi!", "add_special_tokens": False}).json()["tokens"] == [72, 105, 33]
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert "".join(chr(t) for t in chat["tokens"]) == "<|user|>Hi\n<|assistant|>"
    assert post(server, "/detokenize", {"tokens": [72, 105, 33]}).json() == {"prompt": "Hi!"}
    for path, body, param in [
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "Hi"}]}, None),
        ("/detokenize", {"tokens": [-5]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]:
        error = assert_openai_error(post(server, path, body), 400)
        if param:
            assert error["param"] == param
    assert post(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 401  # the API key guards them too


def test_version(server: LiveServer) -> None:
    version = httpx.get(f"{server.url}/version", headers={"Authorization": f"Bearer {API_KEY}"}).json()["version"]
    assert version and version[0].isdigit()
