"""What the server does with request fields it does not use: the one place that decides.

* A field whose meaning this server does not implement and that would change the answer is a 400
  naming it (:data:`UNSUPPORTED`), unless its value is the one that changes nothing (``tools: []``,
  ``response_format: {"type": "text"}``, ``use_beam_search: false`` ...).
* A field that changes nothing here (:data:`NO_EFFECT`: ``store``, ``metadata``, ``user`` ...) is
  accepted; the declared ones are still type-checked by the request models.
* Any other field is unknown: accepted, unused, and its name is logged once at warning level
  (:class:`UnknownFieldLog`), as vLLM does: escaped and cut short, and only the first
  :data:`MAX_LOGGED_UNKNOWN_FIELDS` names the server meets, then one line saying that more are not logged.

Fields the models declare are typed strictly; a wrong type is a 400, never a silent coercion.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from amulet_core.errors import InvalidParameterError

logger = logging.getLogger(__name__)


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


_TOOLS = "the legacy 'functions' API is not supported; use 'tools' and 'tool_choice'."

UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # name: (is this value harmless?, why the others are refused)
    "functions": (_unset, _TOOLS),
    "function_call": (lambda v: v in (None, "none", "auto"), _TOOLS),
    "audio": (_unset, "Audio output is not supported."),
    "modalities": (lambda v: v is None or v == ["text"], "Only the 'text' modality is supported."),
    "web_search_options": (_unset, "Web search is not supported."),
    "use_beam_search": (_unset, "Beam search is not supported; use 'n' for several samples."),
    "length_penalty": (lambda v: v is None or v == 1, "'length_penalty' applies to beam search, which is not supported."),
    "best_of": (lambda v: v is None or v == 1, "'best_of' is not supported; use 'n' for several samples."),
    "echo": (_unset, "'echo' is only supported by /v1/completions."),
    "include_stop_str_in_output": (_unset, "Stop strings are never included in the output here."),
    "bad_words": (_unset, "'bad_words' is not supported; 'logit_bias' of -100 bans tokens."),
    "allowed_token_ids": (_unset, "'allowed_token_ids' is not supported."),
    "prompt_logprobs": (_unset, "Prompt log-probabilities are not supported."),
    "truncate_prompt_tokens": (lambda v: v is None, "Prompts are never truncated here."),
    "chat_template": (lambda v: v is None, "Custom chat templates are not accepted; the model's own is used."),
    "documents": (_unset, "'documents' are not supported."),
    "return_tokens_as_token_ids": (_unset, "'return_tokens_as_token_ids' is not supported."),
    "logits_processors": (_unset, "Custom logits processors are not supported."),
    "suffix": (_unset, "'suffix' (fill in the middle) is not supported."),
    "guidance_scale": (lambda v: v is None, "classifier-free guidance needs a chat request (/v1/chat/completions)."),
    "negative_prompt": (lambda v: v is None, "classifier-free guidance needs a chat request (/v1/chat/completions)."),
}
"""Known fields that would change the answer and that this server does not implement."""

NO_EFFECT: dict[str, str] = {
    "user": "an end-user id for abuse monitoring",
    "safety_identifier": "an end-user id for abuse monitoring",
    "store": "no answers are stored",
    "metadata": "no answers are stored",
    "service_tier": "one tier",
    "prompt_cache_key": "the prefix cache needs no key",
    "prompt_cache_retention": "the prefix cache needs no key",
    "priority": "requests are served first come, first served",
    "prediction": "predicted outputs only change the latency",
    "stream_options.include_obfuscation": "no obfuscation padding is added",
    "request_id": "the server names its requests",
    "spaces_between_special_tokens": "special tokens are decoded as the tokenizer does",
    "messages[].refusal": "echoed back from answers",
    "messages[].annotations": "echoed back from answers",
    "messages[].audio": "echoed back from answers",
    "messages[].function_call": "echoed back from answers",
    "messages[].reasoning_content": "echoed back from answers",
    "messages[].content[].cache_control": "prompt caching is automatic",
}
"""Known fields that change nothing here (accepted without a log line), and why."""


MAX_LOGGED_UNKNOWN_FIELDS = 64
"""Distinct unknown field names a server logs in its lifetime; after them, one line says more are not logged."""
MAX_LOGGED_NAME_CHARS = 80
"""Characters of an unknown field's name that are logged (the rest is cut, the cut marked with ``...``)."""


def shown_name(path: str, max_chars: int = MAX_LOGGED_NAME_CHARS) -> str:
    """A client's field name as it may go into a log line: cut to ``max_chars`` characters, then quoted and
    escaped as Python's ``repr`` does (no raw newline, escape sequence or bidi control reaches the log)."""
    return repr(path if len(path) <= max_chars else path[:max_chars] + "...")


class UnknownFieldLog:
    """Logs each unknown field name once, at warning level (one instance per app), in bounded memory: at most
    ``capacity`` names (each :func:`shown_name`, so at most ``max_name_chars`` long) are ever kept and logged;
    the first name past them is answered by one line saying that more are not logged, and nothing after."""

    def __init__(self, capacity: int = MAX_LOGGED_UNKNOWN_FIELDS, max_name_chars: int = MAX_LOGGED_NAME_CHARS) -> None:
        self.capacity = capacity
        self.max_name_chars = max_name_chars
        self._seen: set[str] = set()
        self._full = False
        self._lock = threading.Lock()

    @property
    def seen(self) -> frozenset[str]:
        """The names logged so far, as they were logged (quoted and escaped)."""
        with self._lock:
            return frozenset(self._seen)

    @property
    def full(self) -> bool:
        """Whether no further name will be logged."""
        return self._full

    def note(self, path: str) -> None:
        if self._full:
            return
        name = shown_name(path, self.max_name_chars)
        with self._lock:
            if self._full or name in self._seen:
                return
            if len(self._seen) >= self.capacity:
                self._full = True
            else:
                self._seen.add(name)
        if self._full:
            logger.warning("More unknown request fields were sent; they are not logged (the first %d were).", self.capacity)
        else:
            logger.warning("Ignoring the unknown request field %s (accepted, unused; logged once).", name)


def _extras(model: BaseModel, path: str) -> list[tuple[str, str, Any]]:
    """``(dotted path, generic path, value)`` of every undeclared field in ``model`` and its sub-models;
    list positions read ``[i]`` in the dotted path and ``[]`` in the generic one."""
    found = [(f"{path}{key}", f"{path}{key}", value) for key, value in (model.model_extra or {}).items()]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = [(f"{path}{name}.", value)] if isinstance(value, BaseModel) else []
        if isinstance(value, list):
            items = [(f"{path}{name}[{i}].", v) for i, v in enumerate(value) if isinstance(v, BaseModel)]
        for prefix, sub in items:
            for dotted, _, v in _extras(sub, prefix):
                found.append((dotted, _generic(dotted), v))
    return found


_LIST_INDEX = re.compile(r"\[\d+\]")


def _generic(dotted: str) -> str:
    """``messages[3].content[0].x`` as ``messages[].content[].x`` (the indices this module writes)."""
    return _LIST_INDEX.sub("[]", dotted)


def apply_request_policy(body: BaseModel, unknown: UnknownFieldLog | None) -> None:
    """Refuse the unsupported fields that would change the answer; log the unknown ones once (not at all
    when ``unknown`` is None).

    Raises InvalidParameterError naming the field (its dotted path)."""
    for dotted, generic, value in _extras(body, ""):
        if generic in UNSUPPORTED:
            harmless, why = UNSUPPORTED[generic]
            if not harmless(value):
                raise InvalidParameterError(dotted, f"'{dotted}' is not supported by this server: {why}")
        elif generic not in NO_EFFECT and unknown is not None and not unknown.full:
            unknown.note(generic)
