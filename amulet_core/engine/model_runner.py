"""Runs one packed forward pass over the scheduled chunks and returns the logits that are needed."""

from __future__ import annotations

import logging

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.paged_attention import (
    DecodeGroup,
    PackedBatch,
    PagedKVCache,
    SequenceSpan,
    causal_mask,
    register_paged_attention,
)
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence
from amulet_core.loading import LoadedModel

log = logging.getLogger(__name__)


def kv_cache_blocks(config: EngineConfig, bytes_per_token: int) -> int:
    """Blocks for the configured budget, capped at what max_num_seqs full-length sequences can use."""
    tokens = config.kv_cache_tokens
    if tokens is None:
        tokens = int(config.kv_cache_memory_gib * (1 << 30)) // bytes_per_token
    tokens = min(tokens, config.max_num_seqs * (config.max_model_len + config.block_size))
    if tokens < 2 * config.max_model_len:
        raise ValueError(
            f"The KV cache budget ({tokens} tokens) cannot hold one two-context request of max_model_len "
            f"{config.max_model_len}; raise the KV budget or lower max_model_len."
        )
    return -(-tokens // config.block_size)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = config.block_size
        self.model.set_attn_implementation(register_paged_attention())
        text_config = self.model.config.get_text_config()
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        layers = text_config.num_hidden_layers
        per_token = PagedKVCache.bytes_per_token(layers, kv_heads, head_dim, loaded.dtype)
        self.num_blocks = kv_cache_blocks(config, per_token)
        self.cache = PagedKVCache(layers, kv_heads, head_dim, self.num_blocks, self.block_size, loaded.dtype, self.device)
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size * per_token / 2**20,
        )

    def _slots(self, seq: Sequence, end: int) -> torch.Tensor:
        """Cache slots of positions 0..end-1 of a sequence."""
        table = torch.tensor(seq.block_table[: -(-end // self.block_size)], dtype=torch.long)
        offsets = torch.arange(self.block_size, dtype=torch.long)
        return (table.unsqueeze(1) * self.block_size + offsets).reshape(-1)[:end]

    def _decode_group(self, decode_chunks: list[ScheduledChunk]) -> DecodeGroup | None:
        if not decode_chunks:
            return None
        lengths = [c.start + 1 for c in decode_chunks]
        max_len = max(lengths)
        padded = []
        for chunk, length in zip(decode_chunks, lengths, strict=True):
            slots = self._slots(chunk.seq, length)
            padded.append(torch.nn.functional.pad(slots, (0, max_len - length)))
        mask = None
        if min(lengths) != max_len:
            positions = torch.arange(max_len).unsqueeze(0)
            mask = (positions < torch.tensor(lengths).unsqueeze(1)).view(len(lengths), 1, 1, max_len).to(self.device)
        return DecodeGroup(len(decode_chunks), torch.cat(padded).to(self.device), max_len, mask)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], logits_for: list[Sequence]) -> torch.Tensor:
        """One forward pass over all chunks; float32 logits ``[len(logits_for), vocab]`` of each
        listed sequence's last scheduled token, in that order.

        Single-token (decode) chunks are packed first and attended in one batched call.
        """
        decode_chunks = [c for c in chunks if c.num_tokens == 1]
        prefill_chunks = [c for c in chunks if c.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        spans: list[SequenceSpan] = []
        last_index: dict[int, int] = {}
        for chunk in decode_chunks:
            last_index[id(chunk.seq)] = len(input_ids)
            input_ids.append(chunk.seq.token_ids[chunk.start])
            positions.append(chunk.start)
            block = chunk.seq.block_table[chunk.start // self.block_size]
            slot_parts.append(torch.tensor([block * self.block_size + chunk.start % self.block_size]))
        for chunk in prefill_chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            context = self._slots(seq, end)
            slot_parts.append(context[start:])
            spans.append(SequenceSpan(offset, offset + n, context.to(self.device), causal_mask(n, end, self.device)))
            last_index[id(seq)] = offset + n - 1
        batch = PackedBatch(self.cache, torch.cat(slot_parts).to(self.device), tuple(spans), self._decode_group(decode_chunks))
        keep = torch.tensor([last_index[id(seq)] for seq in logits_for], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=self.device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),
            logits_to_keep=keep,
            use_cache=False,
            amulet_batch=batch,
        )
        return out.logits[0].float()
