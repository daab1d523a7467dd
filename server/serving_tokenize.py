"""vLLM's ``/tokenize`` and ``/detokenize`` over an EngineClient: what a prompt costs, what ids say."""

from __future__ import annotations

import asyncio

from amulet_core.engine.protocol import EngineClient
from amulet_core.errors import EngineNotReadyError, InvalidParameterError
from server.generation_fields import check_model, template_options
from server.protocol_tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.request_policy import UnknownFieldLog, apply_request_policy


class OpenAIServingTokenization:
    def __init__(self, engine: EngineClient, model_name: str, unknown_fields: UnknownFieldLog) -> None:
        self.engine = engine
        self.model_name = model_name
        self.unknown_fields = unknown_fields

    def _check(self, model: str | None) -> None:
        check_model(model, self.model_name)
        if not self.engine.ready:
            raise EngineNotReadyError("The model is still loading; retry later.")

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """The ids of a raw prompt, or of chat messages through the chat template (as a chat request
        renders them, without a preference: that adds a sentence to the system message)."""
        apply_request_policy(body, self.unknown_fields)
        self._check(body.model)
        if body.messages is not None:
            options = template_options(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs)
            messages = [m.for_template() for m in body.messages]
            ids = await asyncio.to_thread(self.engine.encode_chat, messages, options)
        else:
            prompt = body.prompt or ""
            ids = await asyncio.to_thread(self.engine.encode_prompt, prompt, body.add_special_tokens is not False)
        strs = self.engine.token_strings(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=list(ids), token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        apply_request_policy(body, self.unknown_fields)
        self._check(body.model)
        vocab = self.engine.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise InvalidParameterError("tokens", f"Token ids must be from 0 to {vocab - 1}.")
        text = await asyncio.to_thread(self.engine.decode, body.tokens)
        return DetokenizeResponse(prompt=text)
