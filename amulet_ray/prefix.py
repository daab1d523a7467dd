"""The routing key of a request: a hash chain over the full token blocks of its rendered pref context.

The ingress renders a request exactly as a replica will, by running the serving code's own ``prepare``
(:func:`server.requests.chat.prepare`, :func:`server.requests.completion.prepare`) over a
:class:`~amulet_core.model.chat_template.ChatTokenizer`: the model's tokenizer and chat template, no
model. The first context's token ids (the pref context of a preference request, the conversation itself
otherwise) are cut into blocks of the engine's ``block_size`` and chained like the engine's prefix cache:
two requests share their first k chain entries exactly when they share their first k full blocks, so the
same system message and preference sentences give the same leading entries whatever the user asks.

The hashes are stable across processes (BLAKE2b, not Python's ``hash``). No Ray here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from amulet_core.model.chat_template import ChatTokenizer
from amulet_core.model.loading import load_tokenizer, model_display_name
from server.anthropic.conversion import to_chat
from server.anthropic.errors import MESSAGES_PATH
from server.anthropic.protocol import MessagesRequest
from server.options import Configs
from server.protocol import ChatCompletionRequest
from server.protocol_completions import CompletionRequest
from server.requests.admission import Admission
from server.requests.chat import prepare as prepare_chat
from server.requests.completion import prepare as prepare_completion
from server.requests.tools import ConfiguredToolParser
from server.responses.chat_request import chat_request
from server.responses.items import input_items
from server.responses.protocol import ResponsesRequest

logger = logging.getLogger(__name__)

MAX_PREFIX_BLOCKS = 128
"""Longest chain a request gets (2,048 tokens at 16 a block): enough to tell prefixes apart, cheap to match."""
UNSIZED_MAX_MODEL_LEN = 1 << 20
"""The context length the ingress checks requests against when ``--max-model-len`` is not set (the replicas size it)."""
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"
KEYED_PATHS = (CHAT_PATH, COMPLETIONS_PATH, MESSAGES_PATH, RESPONSES_PATH)


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


class PrefixKeyer:
    """The routing key (:func:`prefix_chain` of the first context) of chat, text-completion, Messages and Responses
    requests (those two as the chat requests the replica makes of them).

    Requests are rendered by the serving code's own ``prepare`` (:mod:`server.requests.chat`,
    :mod:`server.requests.completion`) over a :class:`ChatTokenizer` of the model's tokenizer: the ingress
    has no model. ``chain`` never raises: a request the serving code refuses (bad JSON, an unknown model, an
    invalid field ...) gets an empty chain, is balanced by Ray's default routing, and the replica answers
    its error. Unknown fields are not logged here: the replica that serves the request logs them.
    """

    def __init__(self, renderer: ChatTokenizer, model_name: str, configs: Configs, max_blocks: int = MAX_PREFIX_BLOCKS) -> None:
        served = configs.server.served_model_name or model_name
        vocab_size = len(renderer.tokenizer)
        parser = ConfiguredToolParser(configs.server.tool_call_parser, renderer.chat_template_text)
        self._renderer = renderer
        # The replicas size their max_model_len from their memory unless it is set: the ingress keys every request up
        # to a million tokens, and the replica refuses what is longer than its own.
        max_model_len = configs.engine.max_model_len or UNSIZED_MAX_MODEL_LEN
        self._admission = Admission(served, configs.server, lambda: max_model_len, lambda: vocab_size, parser)
        self._block_size = configs.engine.block_size
        self._max_blocks = max_blocks

    @classmethod
    def load(cls, configs: Configs) -> PrefixKeyer:
        """Load the tokenizer of ``configs.model`` (seconds; blocking)."""
        return cls(ChatTokenizer(load_tokenizer(configs.model)), model_display_name(configs.model), configs)

    def _get_renderer(self) -> ChatTokenizer:
        return self._renderer

    async def chain(self, method: str, path: str, body: bytes) -> tuple[int, ...]:
        if method != "POST" or path not in KEYED_PATHS:
            return ()
        try:
            if path != COMPLETIONS_PATH:
                chat = await prepare_chat(chat_request_of(path, body), self._get_renderer, self._admission)
                ids = chat.request.prompt_ids
            else:
                text = CompletionRequest.model_validate_json(body)
                completion = await prepare_completion(text, self._get_renderer, self._admission)
                ids = completion.requests[0].prompt_ids
        except Exception as exc:  # the replica answers it; here it only routes without affinity
            logger.debug("No routing key for a %s request: %s", path, type(exc).__name__)
            return ()
        return prefix_chain(ids, self._block_size, self._max_blocks)


def chat_request_of(path: str, body: bytes) -> ChatCompletionRequest:
    """The chat request a replica makes of a chat, Messages or Responses body (raises for one it would refuse). A
    Responses request that continues a stored one is not keyed here (its conversation is in the replica's store):
    it raises LookupError."""
    if path == MESSAGES_PATH:
        return to_chat(MessagesRequest.model_validate_json(body)).body
    if path == RESPONSES_PATH:
        responses = ResponsesRequest.model_validate_json(body)
        if responses.previous_response_id is not None:
            raise LookupError("the conversation is stored")
        return chat_request(responses, input_items(responses))
    return ChatCompletionRequest.model_validate_json(body)
