"""From the fields chat and text completions share (``GenerationFields``) to the domain types.

The HTTP layer only translates here: names (``max_completion_tokens``), JSON shapes (``logit_bias``'s
string keys) and defaults of absent fields. The rules themselves (ranges, greedy below a temperature,
the seed of choice j) live in SamplingParams and MethodSettings, whose errors name the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amulet_core.errors import InvalidParameterError
from amulet_core.grammar.spec import GrammarSpec
from amulet_core.model.chat_template import ChatTemplateOptions
from amulet_core.sampling.params import SamplingParams
from server.protocol import GenerationFields

T = TypeVar("T")


def renamed_param(name: str, alias: str, make: Callable[[], T]) -> T:
    """Run ``make``; an InvalidParameterError about ``name`` is reported under the request's field ``alias``."""
    try:
        return make()
    except InvalidParameterError as exc:
        exc.rename(name, alias)
        raise


def template_options(
    add_generation_prompt: bool | None,
    continue_final_message: bool | None,
    chat_template_kwargs: dict[str, Any] | None,
    messages: Sequence[dict[str, Any]] | None = None,
) -> ChatTemplateOptions:
    """How a conversation is rendered, from vLLM's ``add_generation_prompt`` (default: unless the last message
    is continued), ``continue_final_message`` and ``chat_template_kwargs``; checked against ``messages`` when
    given (a continued message must be the assistant's)."""
    continue_final = bool(continue_final_message)
    add_prompt = (not continue_final) if add_generation_prompt is None else add_generation_prompt
    options = ChatTemplateOptions(
        add_generation_prompt=add_prompt,
        continue_final_message=continue_final,
        template_kwargs=tuple((chat_template_kwargs or {}).items()),
    )
    if messages is not None:
        options.check(messages)
    return options


def parse_logit_bias(logit_bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as ``((id, bias), ...)``; a key that is not a token id is a 400."""
    pairs = []
    for key, bias in (logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise InvalidParameterError("logit_bias", f"'logit_bias' keys are token ids written as whole numbers, got {key!r}.")
        pairs.append((int(key), bias))
    return tuple(pairs)


def sampling_params(
    body: GenerationFields,
    *,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: bool,
    top_logprobs: int,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """The request's SamplingParams; an error about ``max_tokens`` names ``max_tokens_param``."""
    return renamed_param(
        "max_tokens",
        max_tokens_param,
        lambda: SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None or body.top_k == -1 else body.top_k,  # -1 means off in vLLM
            min_p=0.0 if body.min_p is None else body.min_p,
            seed=body.seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
            min_tokens=body.min_tokens or 0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=parse_logit_bias(body.logit_bias),
            skip_special_tokens=body.skip_special_tokens is not False,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            grammar=grammar,
        ),
    )
