"""``POST /v1/completions``: body -> :class:`CompletionIntent` -> token ids -> one GenerationRequest per prompt.

A raw prompt has no system message to carry a preference, so every text completion decodes the prompt as
given (method ``base``); ``preference`` is refused with a pointer to the chat endpoint. The phases of
:mod:`server.requests`; a raw prompt needs no rendering, so :func:`encode` reads the prompts directly.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import ContextLengthExceededError, InvalidParameterError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatRenderer
from amulet_core.sampling.params import SamplingParams
from server.protocol_completions import CompletionRequest
from server.protocol_limits import MAX_PROMPTS
from server.requests.admission import Admission
from server.requests.encoding import check_length_in_chars
from server.requests.fields import renamed_param, sampling_params
from server.requests.grammar import requested_grammar
from server.requests.tenancy import effective_cache_salt

DEFAULT_MAX_TOKENS = 16
"""OpenAI's and vLLM's default for text completions (chat's default is all the room left)."""
Prompt = str | list[int]


@dataclass(frozen=True)
class CompletionIntent:
    """What an admitted text-completion request asks for."""

    body: CompletionRequest
    prompts: tuple[Prompt, ...]
    """Each prompt, as text or as token ids (checked against the vocabulary)."""
    sampling: SamplingParams
    add_special_tokens: bool


@dataclass(frozen=True)
class PreparedCompletion:
    """An admitted and encoded text completion: one engine request per prompt, and each prompt's text."""

    intent: CompletionIntent
    requests: list[GenerationRequest]
    prompt_texts: list[str]


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[Prompt, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if not prompt:
        raise InvalidParameterError("prompt", "'prompt' must not be an empty list.")
    prompts: list[Prompt] = [prompt] if isinstance(prompt[0], int) else list(prompt)
    if len(prompts) > MAX_PROMPTS:
        raise InvalidParameterError("prompt", f"'prompt' takes at most {MAX_PROMPTS} prompts, got {len(prompts)}.")
    return tuple(prompts)


def _check_token_prompts(prompts: tuple[Prompt, ...], admission: Admission) -> None:
    """Token-id prompts: none longer than the context, every id in the vocabulary (C-speed min/max per prompt)."""
    ids = [p for p in prompts if isinstance(p, list)]
    if ids:
        max_model_len = admission.max_model_len()
        longest = max(len(p) for p in ids)
        if longest > max_model_len:
            raise ContextLengthExceededError(
                "prompt", f"This model's maximum context length is {max_model_len} tokens, but a prompt has {longest} tokens."
            )
        vocab = admission.vocab_size()
        if any(p and (min(p) < 0 or max(p) >= vocab) for p in ids):
            raise InvalidParameterError("prompt", f"Token ids in 'prompt' must be from 0 to {vocab - 1}.")


def admit(body: CompletionRequest, admission: Admission) -> CompletionIntent:
    """Phase 1: every rule a completion body must meet that needs no tokenizer."""
    admission.check_generation(body)
    if body.preference is not None:
        raise InvalidParameterError(
            "preference",
            "A raw prompt has no system message to carry a preference: use /v1/chat/completions for 'preference'.",
        )
    prompts = _prompts(body.prompt)
    admission.check_fanout(body.num_choices, prompts=len(prompts))
    _check_token_prompts(prompts, admission)
    sampling = sampling_params(
        body,
        max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        grammar=requested_grammar(body),
    )
    return CompletionIntent(body, prompts, sampling, body.add_special_tokens is not False)


def encode(intent: CompletionIntent, renderer: ChatRenderer, max_model_len: int) -> tuple[list[tuple[int, ...]], list[str]]:
    """Phases 2 and 3: each prompt's token ids and text (token-id prompts decoded for ``echo``); a text prompt
    too long for the context is refused by its characters before the tokenizer runs on any prompt."""
    for prompt in intent.prompts:
        if isinstance(prompt, str):
            check_length_in_chars(prompt, renderer, max_model_len, "prompt", "prompt")
    ids, texts = [], []
    for prompt in intent.prompts:
        if isinstance(prompt, str):
            ids.append(renderer.encode_prompt(prompt, intent.add_special_tokens))
            texts.append(prompt)
        else:
            ids.append(tuple(prompt))
            texts.append(renderer.decode(prompt) if intent.body.echo else "")
    return ids, texts


def assemble(
    intent: CompletionIntent, ids: list[tuple[int, ...]], max_model_len: int, cache_salt: str | None = None
) -> list[GenerationRequest]:
    """Phase 4: one request per prompt (ids ``cmpl-<hex>-<prompt index>``), each of prefix-cache salt
    ``cache_salt`` (:mod:`server.requests.tenancy`); errors name ``prompt``."""
    base_id = f"cmpl-{uuid.uuid4().hex}"
    requests = []
    for i, prompt_ids in enumerate(ids):

        def make(prompt_ids: tuple[int, ...] = prompt_ids, i: int = i) -> GenerationRequest:
            request = GenerationRequest(
                request_id=f"{base_id}-{i}",
                prompt_ids=prompt_ids,
                sampling=intent.sampling,
                method=MethodSettings(method=Method.BASE),
                cache_salt=cache_salt,
            )
            request.max_new_tokens(max_model_len)
            return request

        requests.append(renamed_param("messages", "prompt", make))
    return requests


async def prepare(
    body: CompletionRequest, renderer: Callable[[], ChatRenderer], admission: Admission, tenant: str | None = None
) -> PreparedCompletion:
    """The phases in order; encoding runs off the event loop, on the admission's preparation pool (a full pool is
    a 429). ``tenant``: the caller's, which salts the prefix cache with the body's ``cache_salt``."""
    intent = admit(body, admission)
    chat_renderer = renderer()
    max_model_len = admission.max_model_len()
    ids, texts = await admission.off_loop(lambda: encode(intent, chat_renderer, max_model_len))
    salt = effective_cache_salt(tenant, body.cache_salt)
    return PreparedCompletion(intent, assemble(intent, ids, admission.max_model_len(), salt), texts)
