"""Text completions (``POST /v1/completions``) over an EngineClient: raw prompts, no chat template.

A raw prompt has no system message to carry a preference, so every text completion decodes the
prompt as given (method ``base``); ``preference`` is refused with a pointer to the chat endpoint.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import GenerationRequest, TokenLogprob, Usage
from amulet_core.errors import EngineNotReadyError, InvalidParameterError
from amulet_core.method.settings import Method, MethodSettings
from server.generation_fields import check_choices, check_model, renamed_param, sampling_params
from server.protocol_answers import MIN_LOGPROB, UsageInfo
from server.protocol_completions import (
    MAX_COMPLETION_LOGPROBS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.request_policy import apply_request_policy
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, sse, stream_response
from server.serving_engine import OpenAIServing, RequestTracker
from server.structured_request import requested_grammar

DEFAULT_MAX_TOKENS = 16
"""OpenAI's and vLLM's default for text completions (chat's default is all the room left)."""
MAX_PROMPTS = 256
"""Prompts in one request (each is a request of its own to the engine)."""


def legacy_logprobs(items: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object; ``text_offset`` counts characters from ``offset`` (the echoed prompt)."""
    result = CompletionLogprobs()
    for item in items:
        result.tokens.append(item.token)
        result.token_logprobs.append(max(item.logprob, MIN_LOGPROB))
        result.top_logprobs.append({token: max(lp, MIN_LOGPROB) for _, token, lp in item.top} if item.top else None)
        result.text_offset.append(offset)
        offset += len(item.token)
    return result


class OpenAIServingCompletion(OpenAIServing):
    """``POST /v1/completions`` over any EngineClient."""

    async def create(self, body: CompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        requests, prompt_texts = await self.prepare(body)
        n = body.num_choices
        total = n * len(requests)
        tracker = RequestTracker(self.observer, requests, n, arrival)
        outputs = generate_choices(self.engine, requests, n)
        echoes = [prompt_texts[i // n] if body.echo else "" for i in range(total)]
        request_id = requests[0].request_id.rsplit("-", 1)[0]
        if body.stream:
            chunks = CompletionChunks(request_id, self.model_name, echoes, body.logprobs is not None, body.include_usage)
            return await stream_response(
                outputs, total, chunks, body.include_usage, raw_request, tracker, self.config.retry_after_s
            )
        results = await run_to_end(outputs, total, raw_request, tracker)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        response = CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[
                CompletionChoice(
                    index=r.index,
                    text=echoes[r.index] + r.text,
                    logprobs=legacy_logprobs(r.logprobs, len(echoes[r.index])) if body.logprobs is not None else None,
                    finish_reason=r.finish_reason or "stop",
                )
                for r in results
            ],
            usage=UsageInfo.from_engine(tracker.usage()),
        )
        return JSONResponse(response.model_dump(exclude={"preference"}))

    async def prepare(self, body: CompletionRequest) -> tuple[list[GenerationRequest], list[str]]:
        """One GenerationRequest per prompt (ids ``cmpl-<hex>-<prompt index>``) and each prompt's text."""
        check_model(body.model, self.model_name)
        apply_request_policy(body, self.unknown_fields)
        check_choices(body, self.config.max_n)
        if body.preference is not None:
            raise InvalidParameterError(
                "preference",
                "A raw prompt has no system message to carry a preference: use /v1/chat/completions for 'preference'.",
            )
        if body.suffix:
            raise InvalidParameterError("suffix", "'suffix' (fill in the middle) is not supported.")
        if body.best_of is not None and body.best_of != body.num_choices:
            raise InvalidParameterError("best_of", "'best_of' is not supported; it may only equal 'n'.")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidParameterError(
                "logprobs", f"'logprobs' must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {body.logprobs}."
            )
        if body.echo and body.logprobs is not None:
            raise InvalidParameterError(
                "echo", "'echo' with 'logprobs' needs the prompt's log-probabilities, which this server does not compute."
            )
        if not self.engine.ready:
            raise EngineNotReadyError("The model is still loading; retry later.")
        prompts = self._prompts(body.prompt)
        add_special = body.add_special_tokens is not False
        ids = await asyncio.to_thread(lambda: [self._encode(p, add_special) for p in prompts])
        texts = await asyncio.to_thread(lambda: [p if isinstance(p, str) else self.engine.decode(p) for p in prompts])
        sampling = sampling_params(
            body,
            max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
            max_tokens_param="max_tokens",
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            grammar=requested_grammar(body),
        )
        base_id = f"cmpl-{uuid.uuid4().hex}"
        requests = []
        for i, prompt_ids in enumerate(ids):
            request = renamed_param(
                "messages",
                "prompt",
                lambda prompt_ids=prompt_ids, i=i: GenerationRequest(  # type: ignore[misc]
                    request_id=f"{base_id}-{i}",
                    prompt_ids=prompt_ids,
                    sampling=sampling,
                    method=MethodSettings(method=Method.BASE),
                ),
            )
            renamed_param("messages", "prompt", lambda r=request: r.max_new_tokens(self.engine.max_model_len))  # type: ignore[misc]
            requests.append(request)
        return requests, texts

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidParameterError("prompt", "'prompt' must not be an empty list.")
        if isinstance(prompt[0], int):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise InvalidParameterError("prompt", f"'prompt' takes at most {MAX_PROMPTS} prompts, got {len(prompts)}.")
        vocab = self.engine.vocab_size
        for p in prompts:
            if isinstance(p, list) and any(not 0 <= t < vocab for t in p):
                raise InvalidParameterError("prompt", f"Token ids in 'prompt' must be from 0 to {vocab - 1}.")
        return prompts

    def _encode(self, prompt: str | list[int], add_special_tokens: bool) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return self.engine.encode_prompt(prompt, add_special_tokens)
        return tuple(prompt)


class CompletionChunks:
    """``text_completion`` SSE chunks (a ChunkFormat): the echoed prompt first, then text deltas, then
    each choice's finish; with ``include_usage`` every chunk has ``usage: null`` and a last one the usage."""

    def __init__(self, request_id: str, model_name: str, echoes: list[str], want_logprobs: bool, include_usage: bool) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.created = int(time.time())
        self.echoes = echoes
        self.offsets = [len(e) for e in echoes]
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": [c.model_dump() for c in choices],
        }
        if self.include_usage:
            payload["usage"] = UsageInfo.from_engine(usage).model_dump() if usage is not None else None
        return sse(payload)

    def opening(self, num_choices: int) -> list[str]:
        return [self._chunk([CompletionChoice(index=i, text=e)]) for i, e in enumerate(self.echoes) if e]

    def delta(self, choice: ChoiceOutput) -> list[str]:
        out = choice.output
        if not (out.text or (self.want_logprobs and out.logprobs)):
            return []
        logprobs = None
        if self.want_logprobs:
            logprobs = legacy_logprobs(out.logprobs or (), self.offsets[choice.index])
        self.offsets[choice.index] += len(out.text)
        return [self._chunk([CompletionChoice(index=choice.index, text=out.text, logprobs=logprobs)])]

    def finish(self, index: int, reason: str) -> list[str]:
        return [self._chunk([CompletionChoice(index=index, text="", finish_reason=reason)])]

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage)
