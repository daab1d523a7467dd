"""The routing key of a request: a hash chain over the full token blocks of its rendered pref context.

The ingress renders a request exactly as a replica will, by running the serving code's own ``prepare``
(:class:`server.serving_chat.OpenAIServingChat`, :class:`server.serving_completions.OpenAIServingCompletion`)
over :class:`TokenizerEngine`, an ``EngineClient`` that has the model's tokenizer and chat template but no
model. The first context's token ids (the pref context of a preference request, the conversation itself
otherwise) are cut into blocks of the engine's ``block_size`` and chained like the engine's prefix cache:
two requests share their first k chain entries exactly when they share their first k full blocks, so the
same system message and preference sentences give the same leading entries whatever the user asks.

The hashes are stable across processes (BLAKE2b, not Python's ``hash``). No Ray here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from amulet_core.engine.protocol import EngineStats, GenerationOutput, GenerationRequest
from amulet_core.model.chat_template import ChatTokenizer
from amulet_core.model.loading import load_tokenizer, model_display_name
from server.cli import Configs
from server.observer import NullObserver
from server.protocol import ChatCompletionRequest
from server.protocol_completions import CompletionRequest
from server.request_policy import UnknownFieldLog
from server.serving_chat import OpenAIServingChat
from server.serving_completions import OpenAIServingCompletion

logger = logging.getLogger(__name__)

MAX_PREFIX_BLOCKS = 128
"""Longest chain a request gets (2,048 tokens at 16 a block): enough to tell prefixes apart, cheap to match."""
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def prefix_chain(token_ids: Sequence[int], block_size: int, max_blocks: int = MAX_PREFIX_BLOCKS) -> tuple[int, ...]:
    """One 64-bit hash per full block of ``token_ids`` (at most ``max_blocks``), each over the previous hash and
    the block's tokens; a partial last block is left out, as the engine's prefix cache leaves it out."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    chain: list[int] = []
    previous = b""
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little", signed=True) for t in block), digest_size=8)
        previous = digest.digest()
        chain.append(int.from_bytes(previous, "little"))
    return tuple(chain)


class TokenizerEngine(ChatTokenizer):
    """An ``EngineClient`` with the model's tokenizer and no model: it renders and encodes like ``AsyncEngine``
    (both are a :class:`ChatTokenizer`) and refuses to generate. ``ready`` is always True."""

    def __init__(self, tokenizer: Any, model_name: str, max_model_len: int) -> None:
        super().__init__(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len

    @property
    def ready(self) -> bool:
        return True

    @property
    def load_error(self) -> BaseException | None:
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        raise NotImplementedError("the ingress only renders requests; replicas generate")
        yield  # pragma: no cover - makes this an async generator, like the protocol's

    def stats(self) -> EngineStats:
        return EngineStats()


class _Unlogged(UnknownFieldLog):
    """The ingress renders every request too: the replica that serves it logs its unknown fields, once is enough."""

    def note(self, path: str) -> None:
        return None


class PrefixKeyer:
    """The routing key (:func:`prefix_chain` of the first context) of chat and text-completion requests.

    ``chain`` never raises: a request the serving code refuses (bad JSON, an unknown model, an invalid
    field ...) gets an empty chain, is balanced by Ray's default routing, and the replica answers its error.
    """

    def __init__(self, engine: TokenizerEngine, configs: Configs, max_blocks: int = MAX_PREFIX_BLOCKS) -> None:
        model_name = configs.server.served_model_name or engine.model_name
        unknown = _Unlogged()
        self._chat = OpenAIServingChat(engine, model_name, configs.server, NullObserver(), unknown)
        self._completions = OpenAIServingCompletion(engine, model_name, configs.server, NullObserver(), unknown)
        self._block_size = configs.engine.block_size
        self._max_blocks = max_blocks

    @classmethod
    def load(cls, configs: Configs) -> PrefixKeyer:
        """Load the tokenizer of ``configs.model`` (seconds; blocking)."""
        name = model_display_name(configs.model)
        return cls(TokenizerEngine(load_tokenizer(configs.model), name, configs.engine.max_model_len), configs)

    async def chain(self, method: str, path: str, body: bytes) -> tuple[int, ...]:
        if method != "POST" or path not in (CHAT_PATH, COMPLETIONS_PATH):
            return ()
        try:
            if path == CHAT_PATH:
                prepared = await self._chat.prepare(ChatCompletionRequest.model_validate_json(body))
                ids = prepared.request.prompt_ids
            else:
                requests, _ = await self._completions.prepare(CompletionRequest.model_validate_json(body))
                ids = requests[0].prompt_ids
        except Exception as exc:  # the replica answers it; here it only routes without affinity
            logger.debug("No routing key for a %s request: %s", path, type(exc).__name__)
            return ()
        return prefix_chain(ids, self._block_size, self._max_blocks)
