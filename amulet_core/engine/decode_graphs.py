"""Decode steps replayed from CUDA graphs, captured per (batch bucket, context bucket) at start-up or on first use.

On a GPU a decode step's forward pass is a few milliseconds of device work, launched as hundreds of
small kernels by transformers' modules and the attention hook; launching them from Python costs more
than the work itself. A step whose every chunk is one new token is therefore padded to a bucket (a
batch size of :func:`batch_buckets`, a context length of :func:`context_buckets`) and replayed from
the graph captured for that bucket: the host launches one graph instead of the kernels.

Static inputs, shared by every graph (each uses the leading part): token ids, positions, the new
tokens' cache slots, the context lengths and the block tables. The context slots and the padding
mask are computed inside the graph from the tables and lengths. A padding row reads and writes the
scratch block, which the block manager never hands out; its logits are dropped. Every graph ends by
copying its logits into one static buffer allocated outside the graphs' memory pool, so the graphs can
share that pool and be replayed in any order. A step whose requests :meth:`DecodeGraphs.run` is given as its
``tail`` replays a graph that then also computes their method and choice of tokens over that buffer
(:mod:`amulet_core.engine.decode_tail`): one per bucket and :class:`~amulet_core.engine.decode_tail.TailVariant` (the
parts of the tail the step needs): the common ones at start-up (:data:`START_TAIL_VARIANTS`), the others on first use.

:meth:`DecodeGraphs.capture_at_start` captures the buckets smallest first within a time budget, so that the
first requests do not pay for it; what the budget leaves is captured on first use.

``capture=False`` runs the same padded, fixed-shape forward eagerly, on any device: the CPU tests use
it to check that padding and bucketing leave each real row's logits and the engine's tokens unchanged.
With ``invariant`` weights the forward is the batch-invariant one (its padding rows then change no bit of
the real rows). With ``paged_kernel`` decode attention reads the rows' lengths and block tables in place, so the
graphs need no context buckets: one per batch size, captured for the longest context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from amulet_core.device_tensors import StagedTensors
from amulet_core.engine.decode_tail import DecodeTail, TailVariant
from amulet_core.engine.fixed_order_kernel import FixedOrderAttention
from amulet_core.engine.graph_buckets import START_TAIL_VARIANTS, batch_buckets, context_buckets, smallest_at_least
from amulet_core.engine.invariant_attention import InvariantPlan, decode_plan
from amulet_core.engine.invariant_ops import PackedWeights, batch_invariant
from amulet_core.engine.overlap import PendingTokens, pending_places
from amulet_core.engine.packed_forward import PackedForward
from amulet_core.engine.paged_attention import PackedBatch, PagedKVCache, decode_group, padded_block_tables
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.shared_prefixes import FOLLOWERS, shared_prefixes
from amulet_core.engine.tail_rows import TailRow
from amulet_core.grammar.masks import GrammarMasks

logger = logging.getLogger(__name__)


class DecodeGraphs:
    """Padded, fixed-shape decode forward passes; on CUDA captured once per bucket and replayed.

    Contract: :meth:`run` takes the chunks of a step whose chunks are all single new tokens, in the
    order the logits come back; :meth:`bucket` must have found a bucket for them. The logits it
    returns are a view of a buffer the next call overwrites.
    """

    def __init__(
        self,
        forward: PackedForward,
        cache: PagedKVCache,
        scratch_block: int,
        vocab: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
        capture: bool,
        invariant: PackedWeights | None = None,
        paged_kernel: bool = False,
        attention_kernel: FixedOrderAttention | None = None,
    ) -> None:
        self.forward = forward
        self.invariant = invariant
        """The batch-invariant forward's weights (None: the SDPA forward)."""
        self.attention_kernel = attention_kernel
        """The batch-invariant attention's compiled kernel (None: its torch operations)."""
        self.cache = cache
        self.block_size = cache.block_size
        self.scratch_block = scratch_block
        self.device = device
        self.capture = capture
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.paged_kernel = paged_kernel
        """Decode rows attend with the paged decode kernel, which reads each row's length from the static inputs:
        one context bucket (the longest) serves every length."""
        self.context_lens = context_buckets(self.block_size, max_model_len)
        if paged_kernel:
            self.context_lens = self.context_lens[-1:]
        max_batch, max_len = self.batch_sizes[-1], self.context_lens[-1]
        self.inputs = StagedTensors(
            {
                "rows": ((4, max_batch), torch.long, 0),
                "pending": ((2, max_batch), torch.long, 0),
                "followers": ((max_batch, FOLLOWERS), torch.long, -1),
                "skip": ((max_batch,), torch.long, 0),
                "tables": ((max_batch, max_len // self.block_size), torch.long, scratch_block),
            },
            device,
        )
        """The static inputs, set with one copy a step (:class:`~amulet_core.device_tensors.StagedTensors`; the tables
        last: a step copies the rows of its batch)."""
        self.rows = self.inputs["rows"]
        """Token ids, positions, new-token slots and context lengths of the rows."""
        self.pending = self.inputs["pending"]
        """Where the rows' token ids are still pending, and the rows of the pending tokens that hold them."""
        self.tables = self.inputs["tables"]
        self.logits = torch.zeros(max_batch, vocab, dtype=torch.float32, device=device)
        self.tail = DecodeTail(max_batch, max_batch, vocab, device, max_history=max_len + 1)
        """The method and choice of tokens over the logits (:mod:`amulet_core.engine.decode_tail`), for a step that asks
        for it: the parts it needs (:class:`TailVariant`) in a graph of their own, or eagerly."""
        self.tail_steps = 0
        """Steps whose tokens the tail chose."""
        self.tail_enabled = True
        """False once the tail has failed (:meth:`launch`): no graph captured since holds it."""
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        """The forward pass of each bucket (the steps whose tokens the host chooses)."""
        self.tail_graphs: dict[tuple[tuple[int, int], TailVariant], torch.cuda.CUDAGraph] = {}
        """The forward pass and a variant of the tail, per bucket: :data:`START_TAIL_VARIANTS` at start-up, the others on
        first use."""
        self.tail_alone: dict[tuple[int, TailVariant], torch.cuda.CUDAGraph] = {}
        """The tail by itself, per batch bucket and variant (:meth:`run_tail`), captured on first use."""
        self.pool: Any = None
        self.capture_seconds = 0.0
        """Time spent warming up and capturing graphs, all buckets together."""
        self.steps = 0
        """Decode steps run through here (replayed, captured, or padded and run eagerly)."""
        self.captured_at_start = 0
        """Graphs :meth:`capture_at_start` captured."""

    def capture_at_start(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> int:
        """Capture the graph of every bucket, the fewest padded tokens first (batch size times context length), then
        those of the :data:`START_TAIL_VARIANTS` in the same order, until ``budget_s`` seconds have passed (a capture
        under way finishes); how many it captured. The static inputs are set to padding rows first, so the captures
        read and write the scratch block only."""
        if not self.capture or budget_s <= 0:
            return 0
        started = clock()
        self.rows.zero_()
        self.rows[2].fill_(self.scratch_block * self.block_size)
        self.rows[3].fill_(1)
        self.tables.fill_(self.scratch_block)
        buckets = sorted(((b, n) for b in self.batch_sizes for n in self.context_lens), key=lambda x: (x[0] * x[1], x))
        for tail in (None, *START_TAIL_VARIANTS):
            for bucket in buckets:
                if clock() - started >= budget_s or (tail is not None and not self.tail_enabled):
                    return self.captured_at_start
                if tail is None and bucket not in self.graphs:
                    self._capture(bucket)
                elif tail is not None and (bucket, tail) not in self.tail_graphs:
                    try:
                        self._capture(bucket, tail)
                    except Exception:  # as in launch: the tail off, the graphs kept
                        logger.exception("capturing the decode graphs' tail failed; the host chooses the tokens")
                        self.tail_enabled = False
                        continue
                else:
                    continue
                self.captured_at_start += 1
        return self.captured_at_start

    def bucket(self, batch: int, max_context: int) -> tuple[int, int] | None:
        """The (batch, context length) bucket of a decode step, or None when it is larger than all."""
        size = smallest_at_least(self.batch_sizes, batch)
        length = smallest_at_least(self.context_lens, max_context)
        return None if size is None or length is None else (size, length)

    def run(
        self,
        chunks: list[ScheduledChunk],
        bucket: tuple[int, int],
        pending: PendingTokens | None = None,
        tail: list[TailRow] | None = None,
        masks: GrammarMasks | None = None,
    ) -> torch.Tensor:
        """Float32 logits ``[len(chunks), vocab]`` of the chunks' new tokens, in chunk order (a token still pending
        is taken from ``pending``'s device tensor). ``tail``: the step's requests, whose rows number the chunks; their
        choices are then :meth:`DecodeTail.samples` of :attr:`tail`, unless :attr:`tail_enabled` has turned False;
        ``masks``: the grammar masks of some of them."""
        if tail is not None:  # first: rows it cannot hold raise here, before anything runs (the host then chooses)
            self.tail.set_rows(tail, masks)
        self.steps += 1
        size, length = bucket
        bs, blocks, scratch = self.block_size, length // self.block_size, self.scratch_block
        pad = size - len(chunks)
        token_ids, positions, slots, lengths = [], [], [], []
        for chunk in chunks:
            seq, p = chunk.seq, chunk.start
            token_ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lengths.append(p + 1)
        token_ids += [0] * pad
        positions += [0] * pad
        slots += [scratch * bs] * pad
        lengths += [1] * pad
        tables = padded_block_tables([*(c.seq.block_table for c in chunks), *([[]] * pad)], blocks, scratch)
        host = self.inputs.host
        host("rows")[:, :size] = torch.tensor([token_ids, positions, slots, lengths], dtype=torch.long)
        host("tables")[:size, :blocks] = torch.tensor(tables, dtype=torch.long).view(size, blocks)
        if self.paged_kernel:  # the blocks rows share, read once (the padding rows share none)
            followers, skip = shared_prefixes(chunks, bs) or ([], [])
            host("followers")[:size] = -1
            host("skip")[:size] = 0
            if skip:
                host("followers")[: len(chunks)] = torch.tensor(followers, dtype=torch.long)
                host("skip")[: len(chunks)] = torch.tensor(skip, dtype=torch.long)
        where, rows = pending_places(token_ids[: len(chunks)], chunks, pending) if pending is not None else ([], [])
        if where:
            host("pending")[:, : len(where)] = torch.tensor([where, rows], dtype=torch.long)
        self.inputs.commit("tables", size)
        if where and pending is not None:  # after the copy: the tokens of the step in flight, on the device
            places, sources = self.pending[0, : len(where)], self.pending[1, : len(where)]
            self.rows[0].index_copy_(0, places, pending.tokens.index_select(0, sources))
        self.launch(bucket, self.tail.variant if tail is not None else None)
        self.tail_steps += tail is not None and self.tail_enabled  # (a tail that failed here chose nothing)
        return self.logits[: len(chunks)]

    def run_tail(self, size: int, tail: list[TailRow], masks: GrammarMasks | None = None) -> None:
        """The tail alone for ``tail``'s requests over the logits of the forward pass :meth:`run` launched last (without
        a tail) in batch bucket ``size``: their choices are then :meth:`DecodeTail.samples` of :attr:`tail`, unless
        :attr:`tail_enabled` has turned False (the tail failed: logged, the logits kept). For a step whose masks and
        rows follow tokens still on the device when its forward pass is launched (the host reads them meanwhile).
        Raises :class:`~amulet_core.engine.decode_tail.TailRowsError`, having run nothing, for rows the tail cannot
        hold."""
        self.tail.set_rows(tail, masks)
        variant = self.tail.variant
        try:
            if not self.capture:
                self.tail.compute(self.logits, size, variant, self.rows[0, :size])
            elif (graph := self.tail_alone.get((size, variant))) is not None:
                graph.replay()
            else:
                self._capture_tail(size, variant)
        except Exception:
            logger.exception("the decode graphs' tail failed; the host chooses the tokens from now on")
            self.tail_enabled = False
            return
        self.tail_steps += 1

    def launch(self, bucket: tuple[int, int], tail: TailVariant | None = None) -> None:
        """The bucket's forward pass over the static inputs (and the parts ``tail`` names of the tail): replayed,
        captured first, or run eagerly. Where the tail fails (an operation a graph cannot hold on this device, say)
        it is turned off (:attr:`tail_enabled`) and the pass runs again without it: the graphs stay, the host
        chooses the tokens."""
        try:
            self._launch(bucket, tail if self.tail_enabled else None)
        except Exception:
            if tail is None or not self.tail_enabled:
                raise
            logger.exception("the decode graphs' tail failed; the host chooses the tokens from now on")
            self.tail_enabled = False
            self._launch(bucket, None)

    def _launch(self, bucket: tuple[int, int], tail: TailVariant | None) -> None:
        if not self.capture:
            self._forward(*bucket, tail)
        elif (graph := self.graphs.get(bucket) if tail is None else self.tail_graphs.get((bucket, tail))) is not None:
            graph.replay()
        else:
            self._capture(bucket, tail)

    def _forward(self, size: int, length: int, tail: TailVariant | None = None) -> None:
        """The padded forward pass of one bucket, and the ``tail`` parts of the tail over its first ``size`` request
        slots, reading only the static inputs."""
        token_ids, positions, slots, lengths = self.rows[:, :size]
        tables = self.tables[:size, : length // self.block_size]
        if self.invariant is not None:
            plan = InvariantPlan(decode_plan(tables, lengths, self.block_size, length), (), self.attention_kernel)
            batch = PackedBatch(self.cache, slots, (), invariant=plan)
        else:
            shared = (self.inputs["followers"][:size], self.inputs["skip"][:size]) if self.paged_kernel else None
            group = decode_group(tables, lengths, self.block_size, length, self.paged_kernel, shared)
            batch = PackedBatch(self.cache, slots, (), group)
        with batch_invariant(self.invariant) if self.invariant is not None else nullcontext():
            logits = self.forward(token_ids.unsqueeze(0), positions.unsqueeze(0), 0, batch)
        self.logits[:size].copy_(logits[0])
        if tail is not None:
            self.tail.compute(self.logits, size, tail, token_ids)

    def _capture(self, bucket: tuple[int, int], tail: TailVariant | None = None) -> None:
        """Capture the bucket's graph (and replay it). The warm-up writes the real rows' keys and values, which the
        replay writes again, identically."""
        size, length = bucket
        graph = self._captured(lambda: self._forward(size, length, tail))
        if tail is None:
            self.graphs[bucket] = graph
        else:
            self.tail_graphs[(bucket, tail)] = graph

    def _capture_tail(self, size: int, variant: TailVariant) -> None:
        """Capture the tail alone over the first ``size`` rows (:meth:`run_tail`), and replay it."""
        self.tail_alone[(size, variant)] = self._captured(
            lambda: self.tail.compute(self.logits, size, variant, self.rows[0, :size])
        )

    def _captured(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """``work`` run once (lazy initialisation, cuBLAS handles and kernels, must not happen while capturing),
        captured into a graph of the shared pool, and replayed."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        work()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            work()
        if self.pool is None:
            self.pool = graph.pool()
        graph.replay()
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
        return graph
