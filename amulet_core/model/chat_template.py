"""A model's chat template and tokenizer, seen the way the server needs them, with nothing of the model.

:class:`ChatTemplateOptions` says how a conversation is rendered; :func:`chat_text` renders one to text
and :func:`render_chat` to token ids. :class:`ChatTokenizer` holds a Hugging Face tokenizer and offers
the text side of serving: render, encode and decode, the template's own default system prompt,
whether it renders tools and whether it takes a system message (each probed once). A template without
a system role (Gemma 2, Mistral v0.1/v0.2) gets the system text folded into the first user turn
(:func:`fold_system_into_first_user`), the way Gemma 3's template does it itself. The engine's
:class:`~amulet_core.engine.async_engine.AsyncEngine` renders with one, and so does a process that
renders requests without running the model (the Ray ingress).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from amulet_core.errors import InvalidParameterError

Message = dict[str, Any]
"""One OpenAI-style chat message, as the chat template takes it."""


RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
"""Arguments of ``apply_chat_template`` itself: not template variables, so never taken from a request."""


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How a conversation is rendered: the generation prompt, continuing the last (assistant) message,
    and extra variables for the template (``chat_template_kwargs``, e.g. ``enable_thinking``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI ``tools`` entries, given to the template as ``tools=`` (for templates that render them)."""

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidParameterError(
                "continue_final_message",
                "'continue_final_message' continues the last message, so 'add_generation_prompt' must be false.",
            )
        for key, _ in self.template_kwargs:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise InvalidParameterError(
                    f"chat_template_kwargs.{key}", f"'{key}' is not a template variable and cannot be set here."
                )

    def check(self, messages: Sequence[Message]) -> None:
        """Raises InvalidParameterError when these options cannot render ``messages``."""
        if self.continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise InvalidParameterError("continue_final_message", "'continue_final_message' needs a last 'assistant' message.")


DEFAULT_TEMPLATE_OPTIONS = ChatTemplateOptions()


def chat_text(tokenizer: Any, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS) -> str:
    """The text of a conversation through the tokenizer's chat template (generation prompt added by default).

    Raises InvalidParameterError naming ``messages`` when the template refuses the conversation."""
    options.check(messages)
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            **({"tools": list(options.tools)} if options.tools else {}),
            **dict(options.template_kwargs),
        )
    except Exception as exc:  # a template may raise on roles or orders it does not support
        raise InvalidParameterError("messages", f"The model's chat template rejected the messages: {exc}") from exc
    return str(text)


def render_chat(
    tokenizer: Any, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (:func:`chat_text`, then encoded)."""
    return list(tokenizer(chat_text(tokenizer, messages, options), add_special_tokens=False)["input_ids"])


_PROBE_TOOL = "probe_tool_x1e"


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes a request's ``tools`` and an assistant message's ``tool_calls`` into the
    prompt (Qwen2.5's and Llama 3.1's do; SmolLM2's does not): both probes' names must appear.

    The probe's call id is one character, so a template that takes only ids of its own shape (Mistral v0.3's:
    nine alphanumerics, where this server writes ``call_`` and 24 hex digits) counts as not rendering tools
    and gets the described fallback (``server.requests.tool_prompts``), which takes any id."""
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe", "parameters": {"type": "object"}}}
    call = {"id": "c", "type": "function", "function": {"name": _PROBE_TOOL + "_call", "arguments": {}}}
    messages = [
        {"role": "user", "content": "probe"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "probe", "tool_call_id": "c"},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses tools does not render them
        return False
    return _PROBE_TOOL in text and _PROBE_TOOL + "_call" in text


_PROBE_SYSTEM = "\x1esystem-probe\x1e"
_PROBE_USER = "\x1euser-probe\x1e"


def template_default_system_prompt(tokenizer: Any) -> str | None:
    """The system message a model's chat template inserts into a conversation that has none, or None.

    Found by rendering a probe conversation with and without a system message: SmolLM2's template, for
    one, inserts "You are a helpful AI assistant named SmolLM, trained by Hugging Face".
    """
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}], tokenize=False
        )
        without = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_USER}], tokenize=False)
    except Exception:  # a template that refuses system messages has no default to find
        return None
    if with_system.count(_PROBE_SYSTEM) != 1:
        return None
    before, after = with_system.split(_PROBE_SYSTEM)
    if not (without.startswith(before) and without.endswith(after)) or len(without) < len(before) + len(after):
        return None
    found = without[len(before) : len(without) - len(after)]
    return found or None


def template_accepts_system(tokenizer: Any) -> bool:
    """Whether the chat template renders a system message (Gemma 2's and Mistral v0.2's raise on one)."""
    probe = "system_probe_7c3"  # no edge characters a template's ``trim`` would take off (Llama 3.1 trims)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "user_probe_7c3"}], tokenize=False
        )
    except Exception:  # "System role not supported", "Conversation roles must alternate ..."
        return False
    return probe in text


def fold_system_into_first_user(messages: Sequence[Message]) -> list[Message]:
    """The conversation for a template without a system role: the text of its system messages (joined by a
    blank line) put before the first user message's text after a blank line, the system messages dropped.
    An empty system text is dropped alone; a conversation whose system or first user content is not a
    string, or that has no user message, is returned as is (the template then refuses it by name)."""
    systems = [m for m in messages if m.get("role") == "system"]
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if not systems or first_user is None:
        return [dict(m) for m in messages]
    texts = [m.get("content") or "" for m in systems]
    user_content = messages[first_user].get("content") or ""
    if not all(isinstance(t, str) for t in texts) or not isinstance(user_content, str):
        return [dict(m) for m in messages]
    prefix = "\n\n".join(t for t in texts if t)
    out = []
    for i, message in enumerate(messages):
        if message.get("role") == "system":
            continue
        message = dict(message)
        if i == first_user and prefix:
            message["content"] = f"{prefix}\n\n{user_content}" if user_content else prefix
        out.append(message)
    return out


class ChatRenderer(Protocol):
    """The text side of serving a model: its chat template, tokenizer and detokenizer, and nothing of the
    model's weights. Every method is synchronous and may take a while on long text: asyncio callers run
    them in a thread."""

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: a text of more than ``n * max_token_chars``
        characters takes more than ``n`` tokens, which callers check before tokenizing."""
        ...

    def chat_text(self, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS) -> str:
        """A conversation through the chat template, as text; raises InvalidParameterError naming ``messages``."""
        ...

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Token ids of rendered chat text (the template wrote its own special tokens)."""
        ...

    def encode_chat(
        self, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS
    ) -> tuple[int, ...]:
        """``encode_text(chat_text(messages, options))``."""
        ...

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
        """Token ids of a raw prompt (no chat template); ``add_special_tokens`` adds the tokenizer's BOS, if any."""
        ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids."""
        ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token id's vocabulary entry (e.g. ``Ġthe``), as vLLM's ``/tokenize`` returns them."""
        ...

    def template_system_prompt(self) -> str | None:
        """The system message the chat template inserts into a conversation without one, or None."""
        ...

    def chat_template_text(self) -> str | None:
        """The chat template (Jinja source), or None."""
        ...

    def template_renders_tools(self) -> bool:
        """Whether the chat template renders ``tools``, assistant ``tool_calls`` and ``tool`` messages."""
        ...


class ChatTokenizer:
    """A Hugging Face tokenizer as a :class:`ChatRenderer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @cached_property
    def max_token_chars(self) -> int:
        # Byte-level and SentencePiece vocabularies write one character per byte or character of the text
        # a token stands for, so the longest entry bounds the characters of any one token.
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1)

    def chat_text(self, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS) -> str:
        if not self.accepts_system and any(m.get("role") == "system" for m in messages):
            messages = fold_system_into_first_user(messages)
        return chat_text(self.tokenizer, messages, options)

    @cached_property
    def accepts_system(self) -> bool:
        """Whether the chat template renders a system message; when it does not, :meth:`chat_text` folds the
        system text into the first user turn."""
        return template_accepts_system(self.tokenizer)

    def encode_text(self, text: str) -> tuple[int, ...]:
        """Token ids of rendered chat text (no special tokens added: the template wrote its own)."""
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(
        self, messages: Sequence[Message], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS
    ) -> tuple[int, ...]:
        return self.encode_text(self.chat_text(messages, options))

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        return str(text)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(token_ids))]

    @cached_property
    def _system_prompt(self) -> str | None:
        return template_default_system_prompt(self.tokenizer)

    def template_system_prompt(self) -> str | None:
        return self._system_prompt

    def chat_template_text(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @cached_property
    def _renders_tools(self) -> bool:
        return template_renders_tools(self.tokenizer)

    def template_renders_tools(self) -> bool:
        return self._renders_tools
