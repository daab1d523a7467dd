"""Every common chat template (each family's real Jinja text, kept under ``templates/`` with its source) set on
the SmolLM2 tokenizer, rendered the way a chat request is: the preference contexts and the contrast context
differ by the preference sentence alone, the ``end`` placement's contexts share the conversation before it, the
generation prompt closes each, tools and a tool-call round trip render (through the template, or described in
the system text where the template ignores them), and greedy base and amulet answers through the real engine
on a tiny random model of the family match the reference.

Templates without a system role (Gemma 2, Mistral v0.1/v0.2) get the system text folded into the first user
turn by :class:`~amulet_core.model.chat_template.ChatTokenizer`, which is what Gemma 3's template does itself."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import (
    TEMPLATE,
    Placement,
    PreferenceContexts,
    preference_contexts,
    resolve_default_system_prompt,
)
from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatTemplateOptions, ChatTokenizer, fold_system_into_first_user
from amulet_core.sampling.params import SamplingParams
from server.requests.tool_prompts import for_template_without_tools
from server.tool_parsers import ToolFunction
from tests.engine.device import build_tiny_template_family_model
from tests.engine.test_engine import drain, tokens_of
from tests.support.http import WEATHER_TOOL as WEATHER

TEMPLATES = Path(__file__).parent / "templates"


@dataclasses.dataclass(frozen=True)
class Case:
    """A chat template, the model family it belongs to, and the text its generation prompt ends with."""

    template: str | None  # file under templates/, None for SmolLM2's own
    family: str
    generation_prompt: str
    renders_tools: bool
    accepts_system: bool


CASES = {
    "llama3.1": Case("llama3_1.jinja", "llama", "<|start_header_id|>assistant<|end_header_id|>\n\n", True, True),
    "qwen2.5": Case("qwen2_5.jinja", "qwen2", "<|im_start|>assistant\n", True, True),
    "qwen3": Case("qwen3.jinja", "qwen3", "<|im_start|>assistant\n", True, True),
    "mistral-v0.3": Case("mistral_v0_3.jinja", "mistral", "[/INST]", False, True),
    "mistral-v0.2": Case("mistral_v0_2.jinja", "mistral", "[/INST]", False, False),
    "gemma2": Case("gemma2.jinja", "gemma2", "<start_of_turn>model\n", False, False),
    "gemma3": Case("gemma3.jinja", "gemma3", "<start_of_turn>model\n", False, True),
    "phi3": Case("phi3.jinja", "phi3", "<|assistant|>\n", False, True),
    "phi4": Case("phi4.jinja", "phi3", "<|im_start|>assistant<|im_sep|>", False, True),
    "smollm2": Case(None, "llama", "<|im_start|>assistant\n", False, True),
}

SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
HISTORY = [
    {"role": "system", "content": "You answer questions about geography."},
    {"role": "user", "content": "What is a tide?"},
    {"role": "assistant", "content": "The rise and fall of the sea."},
    {"role": "user", "content": "Why does it happen?"},
]
CONVERSATIONS = {"single": SINGLE, "history": HISTORY}
SENTENCE = "Your answer should be concise as much as possible."
JOINS = {Placement.SYSTEM: " ", Placement.END: "\n\n"}

TOOL_ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 degrees"},
]


@pytest.fixture(scope="module")
def renderers(smollm_tokenizer) -> dict[str, ChatTokenizer]:
    out = {}
    for name, case in CASES.items():
        tokenizer = copy.deepcopy(smollm_tokenizer)
        if case.template is not None:
            tokenizer.chat_template = (TEMPLATES / case.template).read_text()
        out[name] = ChatTokenizer(tokenizer)
    return out


def contexts_of(renderer: ChatTokenizer, messages: list[dict[str, Any]], placement: Placement) -> PreferenceContexts:
    """The server's preference contexts (``--default-system-prompt template``)."""
    default = resolve_default_system_prompt(TEMPLATE, renderer.template_system_prompt())
    return preference_contexts(messages, ["concise"], default, placement=placement)


def render_with_tools(renderer: ChatTokenizer, conversations: list[list[dict[str, Any]]]) -> list[str]:
    """The texts of ``conversations`` offering WEATHER, as ``server.requests.chat.render`` writes them."""
    options = ChatTemplateOptions()
    if renderer.template_renders_tools():
        options = dataclasses.replace(options, tools=(WEATHER,))
    else:
        default = resolve_default_system_prompt(TEMPLATE, renderer.template_system_prompt())
        conversations = for_template_without_tools(conversations, [ToolFunction.from_openai(WEATHER)], default)
    return [renderer.chat_text(c, options) for c in conversations]


@pytest.mark.parametrize("name", CASES)
def test_template_probes(renderers, name):
    renderer, case = renderers[name], CASES[name]
    assert renderer.template_renders_tools() is case.renders_tools
    assert renderer.accepts_system is case.accepts_system


@pytest.mark.parametrize("placement", list(Placement))
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", CASES)
def test_contexts_differ_by_the_sentence_alone(renderers, name, conversation, placement):
    renderer, case = renderers[name], CASES[name]
    messages = CONVERSATIONS[conversation]
    contexts = contexts_of(renderer, messages, placement)
    pref, contrast = (renderer.chat_text(c) for c in (contexts.prefs[0], contexts.contrast))
    assert SENTENCE in pref and SENTENCE not in contrast
    assert pref.replace(JOINS[placement] + SENTENCE, "", 1) == contrast
    assert pref.endswith(case.generation_prompt) and contrast.endswith(case.generation_prompt)
    for message in messages:  # nothing of the conversation is lost, the system text included
        assert message["content"] in contrast
    assert contexts.system_prompt in contrast
    if placement is Placement.END:  # the contexts share every token up to the last user message's text
        question = messages[-1]["content"]
        head = contrast[: contrast.index(question) + len(question)]
        shared = renderer.encode_text(head)
        pref_ids, contrast_ids = renderer.encode_chat(contexts.prefs[0]), renderer.encode_chat(contexts.contrast)
        assert pref_ids[: len(shared) - 1] == contrast_ids[: len(shared) - 1] == shared[:-1]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.accepts_system])
def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn(renderers, name):
    text = renderers[name].chat_text(HISTORY)
    system, first_user = HISTORY[0]["content"], HISTORY[1]["content"]
    assert f"{system}\n\n{first_user}" in text
    assert text.count(system) == 1


@pytest.mark.parametrize("placement", list(Placement))
@pytest.mark.parametrize("name", CASES)
def test_tools_and_a_tool_call_round_trip(renderers, name, placement):
    renderer = renderers[name]
    contexts = contexts_of(renderer, TOOL_ROUND_TRIP, placement)
    pref, contrast = render_with_tools(renderer, [contexts.prefs[0], contexts.contrast])
    for text in (pref, contrast):
        assert "get_weather" in text and '"city"' in text  # the definition
        assert "Paris" in text and "sunny, 21 degrees" in text  # the call and its result
        assert text.endswith(CASES[name].generation_prompt)
    assert SENTENCE in pref and SENTENCE not in contrast
    assert pref.replace(JOINS[placement] + SENTENCE, "", 1) == contrast
    if not renderer.template_renders_tools():  # the Hermes fallback: described tools, calls and results as text
        assert "<tool_call>" in contrast and "<tool_response>" in contrast


PARALLEL_CALLS: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris and in Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
            for i, city in enumerate(("Paris", "Rome"))
        ],
    },
    {"role": "tool", "tool_call_id": "c0", "content": "sunny, 21 degrees"},
    {"role": "tool", "tool_call_id": "c1", "content": "cloudy, 17 degrees"},
]


@pytest.mark.parametrize("name", CASES)
def test_two_tool_calls_and_their_results(renderers, name):
    """Consecutive results share one user turn in the fallback, so Gemma's and Mistral's alternation holds;
    Llama 3.1's template takes one call per turn and says so (a 400 naming ``messages``)."""
    renderer = renderers[name]
    contexts = contexts_of(renderer, PARALLEL_CALLS, Placement.END)
    if name == "llama3.1":
        with pytest.raises(InvalidParameterError, match="single tool-calls") as caught:
            render_with_tools(renderer, [contexts.contrast])
        assert caught.value.param == "messages"
        return
    (text,) = render_with_tools(renderer, [contexts.contrast])
    for part in ("Paris", "Rome", "sunny, 21 degrees", "cloudy, 17 degrees"):
        assert part in text


@pytest.fixture(scope="module")
def tiny_family_models(smollm_tokenizer):
    """Each family's tiny model, and an eager-attention copy of it (the reference: the engine switches the
    model's own attention to its paged one, and Gemma 2's soft-capped attention needs eager in transformers)."""
    cache: dict[str, Any] = {}

    def make(family: str):
        if family not in cache:
            loaded = build_tiny_template_family_model(family, smollm_tokenizer)
            reference = copy.deepcopy(loaded.model)
            reference.set_attn_implementation("eager")
            cache[family] = (loaded, reference)
        return cache[family]

    return make


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_base_and_amulet_through_the_engine(renderers, tiny_family_models, name):
    renderer, case = renderers[name], CASES[name]
    loaded, reference = tiny_family_models(case.family)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=4096))
    contexts = contexts_of(renderer, HISTORY, Placement.END)
    sampling = SamplingParams(max_tokens=4, temperature=0, logprobs=True)
    requests = []
    for method in (Method.BASE, Method.AMULET):
        ids = [renderer.encode_chat(c) for c in contexts.decoded_by(method)]
        request = GenerationRequest.from_contexts(f"{name}-{method.value}", ids, sampling, MethodSettings(method=method))
        engine.add_request(request)
        requests.append(request)
    outs = drain(engine)
    for request in requests:
        expected = reference_generate(
            reference, request.prompt_ids, request.contrast_prompt_ids, request.method, 4, stop_ids=loaded.eos_token_ids
        )
        assert tokens_of(outs[request.request_id]) == expected
    # Tokens alone can agree where the attention differs: the base answer's first logprob against the reference's.
    base = requests[0]
    logprobs = next(o for o in outs[base.request_id] if o.token_ids).logprobs
    assert logprobs is not None
    first = logprobs[0]
    with torch.no_grad():
        logits = reference(torch.tensor([base.prompt_ids], device=loaded.device)).logits[0, -1].float()
    wanted = torch.log_softmax(logits, dim=-1)[first.token_id].item()
    assert first.logprob == pytest.approx(wanted, abs=1e-3 if loaded.dtype == torch.float32 else 5e-2)
    assert engine.blocks.num_used == 0


def test_a_template_that_drops_system_messages_silently_gets_them_folded(smollm_tokenizer):
    """A template with no system branch writes nothing of a system message and raises nothing: the system text
    (and with it the ``system`` placement's preference) would be lost, so it too goes into the first user turn."""
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    renderer = ChatTokenizer(tokenizer)
    assert not renderer.accepts_system
    contexts = contexts_of(renderer, SINGLE, Placement.SYSTEM)
    pref, contrast = (renderer.chat_text(c) for c in (contexts.prefs[0], contexts.contrast))
    assert pref == f"user: {contexts.system_prompt} {SENTENCE}\n\n{SINGLE[0]['content']}\nassistant: "
    assert contrast == f"user: {contexts.system_prompt}\n\n{SINGLE[0]['content']}\nassistant: "


@pytest.mark.parametrize(
    ("messages", "folded"),
    [
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], [{"role": "user", "content": "S\n\nU"}]),
        ([{"role": "system", "content": ""}, {"role": "user", "content": "U"}], [{"role": "user", "content": "U"}]),
        (
            [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "U"}],
            [{"role": "user", "content": "A\n\nB\n\nU"}],
        ),
        ([{"role": "system", "content": "S"}], [{"role": "system", "content": "S"}]),  # no user turn: left to the template
        (
            [{"role": "system", "content": [{"type": "text", "text": "S"}]}, {"role": "user", "content": "U"}],
            [{"role": "system", "content": [{"type": "text", "text": "S"}]}, {"role": "user", "content": "U"}],
        ),
    ],
    ids=["one", "empty", "two", "no-user", "parts"],
)
def test_fold_system_into_first_user(messages, folded):
    assert fold_system_into_first_user(messages) == folded
