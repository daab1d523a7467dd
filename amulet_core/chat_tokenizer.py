"""The text side of an EngineClient: a model's tokenizer and chat template, with nothing of the model.

:class:`ChatTokenizer` renders and encodes conversations, encodes and decodes text, and reads the chat
template's own default system prompt and whether it renders tools (each probed once). The engine's
:class:`~amulet_core.engine.async_engine.AsyncEngine` answers its text methods with one, and so does a
process that renders requests without running the model (the Ray ingress).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from amulet_core.prompts import (
    DEFAULT_TEMPLATE_OPTIONS,
    ChatTemplateOptions,
    render_chat,
    template_default_system_prompt,
    template_renders_tools,
)


class ChatTokenizer:
    """A Hugging Face tokenizer seen the way the server needs it (the text methods of ``EngineClient``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], options: ChatTemplateOptions = DEFAULT_TEMPLATE_OPTIONS
    ) -> tuple[int, ...]:
        return tuple(render_chat(self.tokenizer, messages, options))

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
