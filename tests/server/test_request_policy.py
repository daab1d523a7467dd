"""The request policy (server/request_policy.py) and the sampling fields, over the fake engine.

Unknown fields are accepted and logged once; fields that change nothing are accepted silently (and
still type-checked); known fields that would change the answer are a 400 naming them. Every bad value
is a 400 naming the field, and the server keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from tests.support.fake_engine import REPLY_TEXT, FakeEngine
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import LiveServer


def chat(server: LiveServer, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, **fields})


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and f"'{name}'" in r.getMessage()]


def test_unknown_fields_are_accepted_and_logged_once(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.requests.policy"):
        for _ in range(3):
            response = chat(server, temperature=0, frobnicate_level=3, stream_options=None)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == REPLY_TEXT
        nested = chat(server, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi", "colour": "red"}]}])
        assert nested.status_code == 200, nested.text
    assert len(warnings_about(caplog, "frobnicate_level")) == 1
    assert len(warnings_about(caplog, "messages[].content[].colour")) == 1


NO_EFFECT_BODIES: list[dict[str, Any]] = [
    {"store": False, "metadata": {"team": "a"}, "service_tier": "auto", "user": "u-1"},
    {"safety_identifier": "hash", "prompt_cache_key": "k", "prompt_cache_retention": "24h", "priority": 0},
    {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
    {"parallel_tool_calls": True, "reasoning_effort": "low", "prediction": {"type": "content", "content": "x"}},
    {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "modalities": ["text"]},
    {"use_beam_search": False, "include_stop_str_in_output": False, "best_of": 1, "echo": False},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}]},
    {"messages": [*USER, {"role": "assistant", "content": "Hello", "refusal": None, "annotations": []}, *USER]},
]


@pytest.mark.parametrize("fields", NO_EFFECT_BODIES)
def test_fields_with_no_effect_are_accepted_silently(
    server: LiveServer, fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="server.requests.policy"):
        response = chat(server, **fields)
    assert response.status_code == 200, response.text
    assert not [r for r in caplog.records if r.name == "server.requests.policy"]


UNSUPPORTED: list[tuple[dict[str, Any], str]] = [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True}, "echo"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"suffix": "end"}, "suffix"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_fields_that_would_change_the_answer_are_400(
    server: LiveServer, fake: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(chat(server, **fields), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]
    assert fake.requests == []
    assert chat(server).status_code == 200


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"store": "yes"}, "store"),
    ({"metadata": {"a": 1}}, "metadata.a"),
    ({"user": 5}, "user"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": "0.5"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias.5"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids[0]"),
    ({"ignore_eos": "true"}, "ignore_eos"),
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"n": 2.0}, "n"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"messages": [{"role": "user", "content": "Hi", "name": 5}]}, "messages[0].name"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_VALUES, ids=[str(f)[:50] for f, _ in BAD_VALUES])
def test_bad_values_are_400_naming_the_field(server: LiveServer, fields: dict[str, Any], param: str) -> None:
    error = assert_openai_error(chat(server, **fields), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert chat(server).status_code == 200


def test_sampling_fields_reach_the_engine(server: LiveServer, fake: FakeEngine) -> None:
    response = chat(
        server,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        min_p=0.1,
        logit_bias={"42": -100, "7": 3.5},
        min_tokens=2,
        stop_token_ids=[5, 6],
        ignore_eos=True,
        skip_special_tokens=False,
        top_k=-1,
    )
    assert response.status_code == 200, response.text
    s = fake.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.5, -0.25, 1.2, 0.1)
    assert dict(s.logit_bias) == {42: -100, 7: 3.5}
    assert (s.min_tokens, s.stop_token_ids, s.ignore_eos, s.skip_special_tokens, s.top_k) == (2, (5, 6), True, False, 0)


def test_message_names_and_template_options_reach_the_template(server: LiveServer, fake: FakeEngine) -> None:
    messages = [{"role": "user", "content": "Hi", "name": "alice"}, {"role": "assistant", "content": "Once upon"}]
    response = chat(
        server,
        messages=messages,
        chat_template_kwargs={"enable_thinking": False},
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert response.status_code == 200, response.text
    prompt = "".join(chr(i) for i in fake.requests[-1].prompt_ids)
    assert prompt == "<|user:alice|>Hi\n<|assistant|>Once upon\n"
    options = fake.template_options[-1]
    assert (options.add_generation_prompt, options.continue_final_message) == (False, True)
    assert options.template_kwargs == (("enable_thinking", False),)


def test_n_choices_with_a_seed(server: LiveServer, fake: FakeEngine) -> None:
    body = chat(server, n=3, seed=7, temperature=0.8, max_tokens=4).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"][:3] for c in body["choices"]] == ["[7]", "[8]", "[9]"]
    assert sorted(r.sampling.seed for r in fake.requests) == [7, 8, 9]
    assert len({r.request_id for r in fake.requests}) == 3
    prompt = len(fake.requests[0].prompt_ids)
    assert body["usage"]["prompt_tokens"] == prompt  # counted once, as OpenAI does
    assert body["usage"]["completion_tokens"] == 3 * 4
    again = chat(server, n=3, seed=7, temperature=0.8, max_tokens=4).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]


def test_n_choices_streamed(server: LiveServer, fake: FakeEngine) -> None:
    fields = {"n": 2, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={"messages": USER, **fields}) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    import json

    chunks = [json.loads(line) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Hello, wö", 1: "Hello, wö"}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
