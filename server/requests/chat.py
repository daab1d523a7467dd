"""``POST /v1/chat/completions``: body -> :class:`ChatIntent` -> texts -> token ids -> GenerationRequest.

The four phases of :mod:`server.requests`, in order; :func:`prepare` runs them all. Nothing here knows the
engine beyond :class:`~amulet_core.model.chat_template.ChatRenderer` and ``GenerationRequest``, nor HTTP.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from amulet_core.engine.protocol import GenerationRequest, ThinkingSpan
from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import (
    TEMPLATE,
    Message,
    PreferenceContexts,
    preference_contexts,
    resolve_default_system_prompt,
)
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatRenderer, ChatTemplateOptions
from amulet_core.sampling.params import SamplingParams
from server.protocol import ChatCompletionRequest
from server.protocol_messages import template_messages
from server.reasoning_parsers import THINK_END, THINK_START, ReasoningParser
from server.requests.admission import Admission
from server.requests.encoding import encode_chat_texts
from server.requests.fields import sampling_params, template_options
from server.requests.grammar import requested_grammar
from server.requests.preference import PreferencePlan, preference_plan
from server.requests.tenancy import effective_cache_salt
from server.requests.tool_prompts import for_template_without_tools
from server.requests.tools import ToolRequest, tool_request


@dataclass(frozen=True)
class ChatIntent:
    """What an admitted chat request asks for, before any rendering."""

    body: ChatCompletionRequest
    messages: tuple[Message, ...]
    """The conversation as the chat template takes it (``ChatMessage.for_template``)."""
    options: ChatTemplateOptions
    """How it is rendered (the tools are added at rendering, where the template shows them)."""
    tools: ToolRequest | None
    plan: PreferencePlan | None
    """The preference (or guidance) plan; None decodes the conversation plainly."""
    settings: MethodSettings
    """The method the contexts are decoded with (``base`` without a plan)."""
    sampling: SamplingParams
    max_tokens_param: str
    """The request's name for the answer's length (``max_completion_tokens`` or ``max_tokens``)."""


@dataclass(frozen=True)
class RenderedChat:
    """The contexts as text, the decoded one first, and how they came about."""

    texts: list[str]
    contexts: PreferenceContexts | None
    """How the contexts were built, for the answer's echo; None for a request without a preference."""
    tools_described: bool
    """The template does not render tools, so they were described in the system message."""


@dataclass(frozen=True)
class PreparedChat:
    """An admitted, rendered and encoded chat request, ready for the engine."""

    intent: ChatIntent
    rendered: RenderedChat
    request: GenerationRequest

    @property
    def body(self) -> ChatCompletionRequest:
        return self.intent.body

    @property
    def tools(self) -> ToolRequest | None:
        return self.intent.tools


def admit(body: ChatCompletionRequest, admission: Admission) -> ChatIntent:
    """Phase 1: every rule a chat body must meet that needs no tokenizer (see the package docstring)."""
    admission.check_generation(body)
    tools = tool_request(body, admission.tool_parser)
    grammar = requested_grammar(body, tools.forced_grammar if tools is not None else None)
    messages = template_messages(body.messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    sampling = sampling_params(
        body,
        max_tokens=body.requested_max_tokens,
        max_tokens_param=param,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        grammar=grammar,
    )
    template_kwargs = body.chat_template_kwargs
    if body.reasoning_effort is not None and "reasoning_effort" not in (template_kwargs or {}):
        # for templates that read it (gpt-oss's); others ignore an unknown variable
        template_kwargs = {**(template_kwargs or {}), "reasoning_effort": body.reasoning_effort}
    options = template_options(body.add_generation_prompt, body.continue_final_message, template_kwargs, messages)
    plan = preference_plan(body, admission.config.max_preferences, admission.config.preference_placement)
    settings = plan.settings if plan is not None else MethodSettings(method=Method.BASE)
    source = "guidance_scale" if plan is not None and body.preference is None else "preference"
    admission.check_fanout(body.num_choices, method=settings, source=source)
    return ChatIntent(body, messages, options, tools, plan, settings, sampling, param)


def render(intent: ChatIntent, renderer: ChatRenderer, default_system_prompt: str) -> RenderedChat:
    """Phase 2: the contexts as text through the chat template. ``default_system_prompt`` is the server's
    setting (``template``, ``paper``, ``none`` or a text) for conversations without a system message."""
    messages = list(intent.messages)
    contexts = None
    conversations = [messages]
    if intent.plan is not None:
        default_system = resolve_default_system_prompt(default_system_prompt, renderer.template_system_prompt())
        contexts = preference_contexts(messages, intent.plan.texts, default_system, intent.plan.negative, intent.plan.placement)
        conversations = contexts.decoded_by(intent.plan.settings.method)
    tools, options = intent.tools, intent.options
    has_tool_roles = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    described = False
    if tools is not None or has_tool_roles:
        if renderer.template_renders_tools():
            options = dataclasses.replace(options, tools=tools.openai_tools if tools is not None else ())
        else:
            described = tools is not None
            template_default = resolve_default_system_prompt(TEMPLATE, renderer.template_system_prompt())
            conversations = for_template_without_tools(conversations, tools.tools if tools else None, template_default)
    texts = [renderer.chat_text(c, options) for c in conversations]
    return RenderedChat(texts, contexts, described)


def thinking_span(intent: ChatIntent, rendered: RenderedChat, renderer: ChatRenderer, parser: str | None) -> ThinkingSpan | None:
    """Where the answer's thinking is, for the engine to decode it without the contrast and the grammar: with a
    reasoning parser, unless the request asks for them in the thinking too, and where ``</think>`` is one token
    of the tokenizer (else None: they apply from the first token)."""
    if parser is None or intent.body.preference_in_reasoning:
        return None
    end, start = renderer.encode_text(THINK_END), renderer.encode_text(THINK_START)
    if len(end) != 1:
        return None
    opened = ReasoningParser.for_prompt(rendered.texts[0]).starts_in_reasoning
    return ThinkingSpan(end[0], start[0] if len(start) == 1 else None, opened)


def encode(rendered: RenderedChat, renderer: ChatRenderer, max_model_len: int) -> list[tuple[int, ...]]:
    """Phase 3: the contexts' token ids; one too long for the context is refused by its characters first."""
    return encode_chat_texts(rendered.texts, renderer, max_model_len)


def assemble(
    intent: ChatIntent,
    ids: list[tuple[int, ...]],
    max_model_len: int,
    cache_salt: str | None = None,
    thinking: ThinkingSpan | None = None,
) -> GenerationRequest:
    """Phase 4: the engine's request, of prefix-cache salt ``cache_salt`` (:mod:`server.requests.tenancy`) and
    reasoning span ``thinking``, refused when a context leaves no room for the answer asked for."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    request = GenerationRequest.from_contexts(request_id, ids, intent.sampling, intent.settings, cache_salt, thinking)
    try:
        request.max_new_tokens(max_model_len)
    except InvalidParameterError as exc:
        exc.rename("max_tokens", intent.max_tokens_param)
        raise
    return request


async def prepare(
    body: ChatCompletionRequest, renderer: Callable[[], ChatRenderer], admission: Admission, tenant: str | None = None
) -> PreparedChat:
    """The four phases in order; rendering and encoding run off the event loop, on the admission's preparation
    pool (templates and tokenizers take a while on long prompts; a full pool is a 429). ``renderer`` is asked
    for only once the body is admitted (the engine's raises EngineNotReadyError while the model loads). ``tenant``:
    the caller's, which salts the prefix cache with the body's ``cache_salt``."""
    intent = admit(body, admission)
    chat_renderer = renderer()

    def render_and_encode() -> tuple[RenderedChat, list[tuple[int, ...]], ThinkingSpan | None]:
        rendered = render(intent, chat_renderer, admission.config.default_system_prompt)
        thinking = thinking_span(intent, rendered, chat_renderer, admission.config.reasoning_parser)
        return rendered, encode(rendered, chat_renderer, admission.max_model_len()), thinking

    rendered, ids, thinking = await admission.off_loop(render_and_encode)
    salt = effective_cache_salt(tenant, body.cache_salt)
    return PreparedChat(intent, rendered, assemble(intent, ids, admission.max_model_len(), salt, thinking))
