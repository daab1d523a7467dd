"""vLLM's ``/tokenize`` and ``/detokenize`` over an EngineClient: what a prompt costs, what ids say. The
tokenizer runs on the preparation pool, as a generation request's does (a full pool is a 429)."""

from __future__ import annotations

from server.protocol_tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.requests.tokenize import admit_detokenize, admit_tokenize, tokenize
from server.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """The ids of a raw prompt, or of chat messages through the chat template (as a chat request
        renders them, without a preference: that adds a sentence to the system message)."""
        intent = admit_tokenize(body, self.admission)
        renderer = self.renderer()
        ids, strs = await self.admission.off_loop(lambda: tokenize(intent, renderer))
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=list(ids), token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        ids = admit_detokenize(body, self.admission)
        renderer = self.renderer()
        text = await self.admission.off_loop(lambda: renderer.decode(ids))
        return DetokenizeResponse(prompt=text)
