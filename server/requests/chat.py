"""``POST /v1/chat/completions``: body -> :class:`ChatIntent` -> texts -> token ids -> GenerationRequest.

The four phases of :mod:`server.requests`, in order; :func:`prepare` runs them all. Nothing here knows the
engine beyond :class:`~amulet_core.model.chat_template.ChatRenderer` and ``GenerationRequest``, nor HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import TEMPLATE, Message, resolve_default_system_prompt
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatRenderer, ChatTemplateOptions
from amulet_core.sampling.params import SamplingParams
from server.protocol import ChatCompletionRequest
from server.requests.admission import Admission
from server.requests.encoding import encode_chat_texts
from server.requests.fields import renamed_param, sampling_params, template_options
from server.requests.grammar import requested_grammar
from server.requests.preference import PlannedContexts, PreferencePlan, plan_contexts, preference_plan
from server.requests.tools import ToolRequest, tool_request, with_tools_described, without_tool_roles


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
    sampling: SamplingParams
    max_tokens_param: str
    """The request's name for the answer's length (``max_completion_tokens`` or ``max_tokens``)."""

    @property
    def settings(self) -> MethodSettings:
        return MethodSettings(method=Method.BASE) if self.plan is None else self.plan.settings


@dataclass(frozen=True)
class RenderedChat:
    """The contexts as text, the decoded one first, and how they came about."""

    texts: list[str]
    planned: PlannedContexts | None
    """None for a request without a preference (one context: the conversation)."""
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
    grammar = requested_grammar(body)
    if tools is not None and tools.choice != "auto":
        if grammar is not None:
            raise InvalidParameterError(grammar.param, f"'{grammar.param}' cannot be combined with a forced 'tool_choice'.")
        grammar = tools.grammar()
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    sampling = sampling_params(
        body,
        max_tokens=body.requested_max_tokens,
        max_tokens_param=param,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        grammar=grammar,
    )
    messages = tuple(m.for_template() for m in body.messages)
    options = template_options(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs)
    options.check(messages)
    plan = preference_plan(body, admission.config.max_preferences)
    return ChatIntent(body, messages, options, tools, plan, sampling, param)


def render(intent: ChatIntent, renderer: ChatRenderer, default_system_prompt: str) -> RenderedChat:
    """Phase 2: the contexts as text through the chat template. ``default_system_prompt`` is the server's
    setting (``template``, ``paper``, ``none`` or a text) for conversations without a system message."""
    tools = intent.tools
    messages = list(intent.messages)
    renders_tools = True
    has_tool_roles = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if (tools is not None or has_tool_roles) and not renderer.template_renders_tools():
        renders_tools = False
        messages = without_tool_roles(messages)
    options = intent.options
    if tools is not None and renders_tools:
        options = dataclasses.replace(options, tools=tools.openai_tools)
    planned = None
    conversations = [messages]
    if intent.plan is not None:
        default_system = resolve_default_system_prompt(default_system_prompt, renderer.template_system_prompt())
        planned = plan_contexts(intent.plan, messages, default_system)
        conversations = planned.conversations
    if tools is not None and not renders_tools:
        template_default = resolve_default_system_prompt(TEMPLATE, renderer.template_system_prompt())
        conversations = [with_tools_described(c, tools.tools, template_default) for c in conversations]
    texts = [renderer.chat_text(c, options) for c in conversations]
    return RenderedChat(texts, planned, tools is not None and not renders_tools)


def encode(rendered: RenderedChat, renderer: ChatRenderer, max_model_len: int) -> list[tuple[int, ...]]:
    """Phase 3: the contexts' token ids; one too long for the context is refused by its characters first."""
    return encode_chat_texts(rendered.texts, renderer, max_model_len)


def assemble(intent: ChatIntent, ids: list[tuple[int, ...]], max_model_len: int) -> GenerationRequest:
    """Phase 4: the engine's request, refused when a context leaves no room for the answer asked for."""
    settings = intent.settings
    request = GenerationRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        prompt_ids=ids[0],
        sampling=intent.sampling,
        method=settings,
        extra_prompt_ids=tuple(ids[1 : settings.num_preferences]) if settings.method is not Method.BASE else (),
        contrast_prompt_ids=ids[-1] if settings.method.has_contrast else None,
    )
    renamed_param("max_tokens", intent.max_tokens_param, lambda: request.max_new_tokens(max_model_len))
    return request


async def prepare(body: ChatCompletionRequest, renderer: Callable[[], ChatRenderer], admission: Admission) -> PreparedChat:
    """The four phases in order; rendering and encoding run on a worker thread (templates and tokenizers take
    a while on long prompts). ``renderer`` is asked for only once the body is admitted (the engine's raises
    EngineNotReadyError while the model loads)."""
    intent = admit(body, admission)
    chat_renderer = renderer()

    def render_and_encode() -> tuple[RenderedChat, list[tuple[int, ...]]]:
        rendered = render(intent, chat_renderer, admission.config.default_system_prompt)
        return rendered, encode(rendered, chat_renderer, admission.max_model_len)

    rendered, ids = await asyncio.to_thread(render_and_encode)
    return PreparedChat(intent, rendered, assemble(intent, ids, admission.max_model_len))
