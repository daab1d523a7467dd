"""The official ``openai`` client against a real uvicorn server over the fake engine."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from amulet_core.method.settings import MethodSettings
from server.config import ServerConfig
from tests.support.fake_engine import CACHED_TOKENS, REPLY_PIECES, REPLY_TEXT, FakeEngine, RecordingObserver
from tests.support.live_server import LiveServer

MODEL = "amulet-test"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(served_model_name=MODEL)


@pytest.fixture()
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_non_streaming_answer_and_usage(client: openai.OpenAI, fake: FakeEngine, observer: RecordingObserver) -> None:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY_TEXT
    assert choice.finish_reason == "stop"
    request = fake.requests[-1]
    assert response.id == request.request_id
    assert response.usage.prompt_tokens == len(request.prompt_ids)
    assert response.usage.completion_tokens == len(REPLY_PIECES)
    assert response.usage.total_tokens == len(request.prompt_ids) + len(REPLY_PIECES)
    assert response.usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS
    assert (response.model_extra or {}).get("preference") is None
    [record] = observer.records
    assert (record.method, record.finish_reason, record.completion_tokens) == ("base", "stop", len(REPLY_PIECES))
    assert record.ttft_s is not None and record.queue_s is not None
    assert len(record.inter_token_s) == len(REPLY_PIECES) - 1


def test_preference_through_extra_body(client: openai.OpenAI, fake: FakeEngine) -> None:
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"preference": "concise"})
    assert response.choices[0].message.content == REPLY_TEXT
    echo = (response.model_extra or {})["preference"]
    defaults = MethodSettings()
    assert echo["text"] == "Your answer should be concise as much as possible."
    assert (echo["method"], echo["iterations"], echo["eta"], echo["alpha"], echo["lambda"]) == ("amulet", 60, 10, 2, 2)
    assert echo["coefficient"] == pytest.approx(defaults.effective_strength)
    request = fake.requests[-1]
    assert request.contrast_prompt_ids is not None
    usage_extra = response.usage.model_extra or {}
    assert response.usage.prompt_tokens == len(request.prompt_ids)
    assert usage_extra["base_prompt_tokens"] == len(request.contrast_prompt_ids)


def test_streaming_with_usage(client: openai.OpenAI, fake: FakeEngine) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"preference": {"text": "formal", "method": "la", "ratio": 3}},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (chunks[0].model_extra or {})["preference"]["coefficient"] == pytest.approx(4.0)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == REPLY_TEXT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(REPLY_PIECES)
    assert last.usage.prompt_tokens == len(fake.requests[-1].prompt_ids)


def test_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY_TEXT


def test_max_tokens_stop_and_logprobs(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert short.choices[0].message.content == "".join(REPLY_PIECES[:3])
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=["你"])
    assert cut.choices[0].message.content == REPLY_TEXT[: REPLY_TEXT.index("你")]
    assert cut.choices[0].finish_reason == "stop"
    with_lp = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert [t.token for t in content] == list(REPLY_PIECES)
    assert len(content[0].top_logprobs) == 2


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_errors_reach_the_client_typed(client: openai.OpenAI, fake: FakeEngine) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=9)
    assert bad.value.status_code == 400
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake.overloaded = True
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_error_inside_a_stream_raises(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[fail]"}], stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="The generation failed"):
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "".join(REPLY_PIECES[:2])
