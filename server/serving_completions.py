"""Text completions (``POST /v1/completions``) over an EngineClient: the prepared requests
(:mod:`server.requests.completion`) to the engine, then a JSON or SSE answer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from amulet_core.engine.parallel_sampling import ChoiceOutput, generate_choices
from amulet_core.engine.protocol import GenerationRequest, TokenLogprob, Usage
from server.auth import tenant_of
from server.protocol_answers import MIN_LOGPROB, UsageInfo
from server.protocol_completions import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.requests.completion import prepare as prepare_completion
from server.serving_choices import CLIENT_CLOSED_REQUEST, run_to_end, sse, stream_response
from server.serving_engine import OpenAIServing, RequestTracker


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
        requests, prompt_texts = await self.prepare(body, tenant_of(raw_request.scope))
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

    async def prepare(self, body: CompletionRequest, tenant: str | None = None) -> tuple[list[GenerationRequest], list[str]]:
        """One GenerationRequest per prompt (:mod:`server.requests.completion`) and each prompt's text; ``tenant``
        is the caller's (:func:`server.auth.tenant_of`)."""
        body = await self.resolve_profile(body, tenant)
        prepared = await prepare_completion(body, self.renderer, self.admission, tenant)
        return prepared.requests, prepared.prompt_texts


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
