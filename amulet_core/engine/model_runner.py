"""Runs one packed forward pass over the scheduled chunks and returns the logits that are needed."""

from __future__ import annotations

import logging

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.decode_graphs import DecodeGraphs
from amulet_core.engine.paged_attention import (
    DecodeGroup,
    PackedBatch,
    PagedKVCache,
    SequenceSpan,
    causal_mask,
    decode_group,
    padded_block_tables,
    register_paged_attention,
)
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence
from amulet_core.model.loading import LoadedModel

logger = logging.getLogger(__name__)


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


def logits_width(model: torch.nn.Module) -> int:
    """The number of token ids the model scores: its output embedding's rows (its config's vocab_size
    when it has no output embedding)."""
    get_head = getattr(model, "get_output_embeddings", None)
    weight = getattr(get_head(), "weight", None) if callable(get_head) else None
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config = getattr(model, "config")  # noqa: B009 (nn.Module has no typed config)
    return int(config.get_text_config().vocab_size)


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
        # One block more than the block manager hands out: the scratch block that padding rows use.
        self.scratch_block = self.num_blocks
        self.cache = PagedKVCache(layers, kv_heads, head_dim, self.num_blocks + 1, self.block_size, loaded.dtype, self.device)
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = config.max_model_len
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.use_decode_graphs(capture=True)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size * per_token / 2**20,
        )

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps padded to fixed-shape buckets: replayed from CUDA graphs with
        ``capture`` (a CUDA device), else eagerly (any device; what the CPU tests check padding with)."""
        vocab = logits_width(self.model)
        self.graphs = DecodeGraphs(
            self.model, self.cache, self.scratch_block, vocab, self.max_num_seqs, self.max_model_len, self.device, capture
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A flat Python list of ints on the device, in one copy."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slot_list(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 of a sequence, as a Python list."""
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _decode_group(self, decode_chunks: list[ScheduledChunk]) -> DecodeGroup | None:
        """The decode sequences' contexts as slots, computed on the device from their block tables.

        Block tables are lists that the block manager grows in place; a step only copies them, padded
        to the longest, in one tensor, with the context lengths in another.
        """
        if not decode_chunks:
            return None
        lengths = [c.start + 1 for c in decode_chunks]
        max_len = max(lengths)
        blocks = -(-max_len // self.block_size)
        tables = padded_block_tables((c.seq.block_table for c in decode_chunks), blocks, 0)  # padding is masked
        padded = min(lengths) != max_len
        return decode_group(
            self._tensor(tables).view(len(decode_chunks), blocks),
            self._tensor(lengths) if padded else None,
            self.block_size,
            max_len,
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], logits_for: list[Sequence]) -> torch.Tensor:
        """One forward pass over all chunks; float32 logits ``[len(logits_for), vocab]`` of each
        listed sequence's last scheduled token, in that order.

        Single-token (decode) chunks are packed first and attended in one batched call. Token ids,
        positions and slots are built as flat Python lists and copied to the device once each.
        """
        decode_chunks = [c for c in chunks if c.num_tokens == 1]
        prefill_chunks = [c for c in chunks if c.num_tokens > 1]
        if self.graphs is not None and decode_chunks and not prefill_chunks:
            bucket = self.graphs.bucket(len(decode_chunks), max(c.start for c in decode_chunks) + 1)
            if bucket is not None:
                try:
                    logits = self.graphs.run(decode_chunks, bucket)
                except Exception:  # a capture that fails (memory, an op graphs cannot hold) must not fail requests
                    logger.exception("decode graph %s failed; decode steps run eagerly from now on", bucket)
                    self.graphs = None
                else:
                    row = {id(c.seq): i for i, c in enumerate(decode_chunks)}
                    return logits.index_select(0, self._tensor([row[id(seq)] for seq in logits_for]))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        spans: list[SequenceSpan] = []
        last_index: dict[int, int] = {}
        for chunk in decode_chunks:
            seq, p = chunk.seq, chunk.start
            last_index[id(seq)] = len(input_ids)
            input_ids.append(seq.token_ids[p])
            positions.append(p)
            slot_mapping.append(seq.block_table[p // bs] * bs + p % bs)
        for chunk in prefill_chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            context = self._slot_list(seq, 0, end)
            slot_mapping.extend(context[start:])
            spans.append(SequenceSpan(offset, offset + n, self._tensor(context), causal_mask(n, end, self.device)))
            last_index[id(seq)] = offset + n - 1
        batch = PackedBatch(self.cache, self._tensor(slot_mapping), tuple(spans), self._decode_group(decode_chunks))
        keep = self._tensor([last_index[id(seq)] for seq in logits_for])
        out = self.model(
            input_ids=self._tensor(input_ids).unsqueeze(0),
            position_ids=self._tensor(positions).unsqueeze(0),
            logits_to_keep=keep,
            use_cache=False,
            amulet_batch=batch,
        )
        return out.logits[0].float()
