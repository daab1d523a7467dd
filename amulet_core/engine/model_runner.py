"""Runs one packed forward pass over the scheduled chunks and returns the logits that are needed."""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from amulet_core.device_tensors import to_device
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.decode_graphs import DecodeGraphs
from amulet_core.engine.decode_tail import TailRowsError
from amulet_core.engine.deferred_contrasts import DeferredContrasts, forward_deferring, outputs_at
from amulet_core.engine.fixed_order_kernel import attention_kernel_for
from amulet_core.engine.graph_buckets import START_TAIL_VARIANTS
from amulet_core.engine.invariant_ops import batch_invariant, invariant_weights
from amulet_core.engine.kv_budget import describe_cache, kv_budget
from amulet_core.engine.layer_kernels import layer_ops_for
from amulet_core.engine.memory import (
    available_ram,
    model_context_length,
    size_cache,
)
from amulet_core.engine.overlap import PendingTokens
from amulet_core.engine.packed_forward import LlamaFamilyForward, packed_forward
from amulet_core.engine.paged_attention import (
    PagedKVCache,
    register_paged_attention,
)
from amulet_core.engine.paged_decode import attention_backend, kernel_probe
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.engine.sequence import Sequence
from amulet_core.engine.step_inputs import StepInputs
from amulet_core.engine.tail_rows import TailHistory, tail_rows
from amulet_core.engine.warm_up import allocator_peak, largest_step
from amulet_core.grammar.masks import GrammarMasks
from amulet_core.method.rows import RowSpec
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.sampler import DeviceSamples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchedForward:
    """A decode step's forward pass queued by :meth:`ModelRunner.launch_forward`, its tail not yet: the graphs that
    hold its logits, its batch bucket and each sequence's row (by ``id``)."""

    graphs: DecodeGraphs
    size: int
    rows: dict[int, int]


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
        self.dtype = loaded.dtype
        self.cache_dtype = config.cache_dtype(loaded.dtype)
        """The KV cache's dtype (EngineConfig.kv_cache_dtype)."""
        self.block_size = config.block_size
        self.model.set_attn_implementation(register_paged_attention())
        text_config = self.model.config.get_text_config()
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        layers = text_config.num_hidden_layers
        self.kv_shape = (layers, kv_heads, head_dim)
        per_token = PagedKVCache.bytes_per_token(layers, kv_heads, head_dim, self.cache_dtype)
        context = model_context_length(text_config)
        self.deterministic = config.deterministic_on(self.device.type)
        """Batch-invariant forward passes (EngineConfig.deterministic)."""
        self.invariant_weights = None
        if self.deterministic:
            self.invariant_weights = invariant_weights(self.model, available_ram())
        if self.deterministic and config.attention_backend == "triton":
            raise ValueError("--attention-backend triton and --deterministic exclude each other (its attention is its own).")
        self.attention_kernel = attention_kernel_for(config.attention_backend, self.deterministic, self.device, self.dtype)
        """The batch-invariant attention's compiled kernel, or None (its torch operations)."""
        self.paged_kernel = not self.deterministic and self._paged_kernel_on(config)
        """Decode rows attend with the paged decode kernel (EngineConfig.attention_backend), else gathered for SDPA."""
        self.forward = packed_forward(self.model, layer_ops_for(self.device, self.dtype, (text_config.hidden_size, head_dim)))
        if isinstance(self.forward, LlamaFamilyForward):
            logger.info("norms and rotations: %s", self.forward.ops.describe())
        budget, why, step_context = kv_budget(
            config, context, per_token, self.block_size, self.device, self.weight_bytes(), self._profile
        )
        try:
            size = size_cache(
                budget, self.block_size, config.max_num_seqs, context, config.max_model_len, step_context=step_context
            )
        except ValueError as exc:
            raise ValueError(f"{exc} (The KV budget: {budget} blocks = {why}.)") from None
        self.num_blocks = size.num_blocks
        self.max_model_len = size.max_model_len
        logger.info(describe_cache(size, why, per_token, self.block_size, config, self.cache_dtype))
        logger.info("decode attention: %s", self._attention_in_words())
        # One block more than the block manager hands out: the scratch block that padding rows use.
        self.scratch_block = self.num_blocks
        self.cache = PagedKVCache(layers, kv_heads, head_dim, self.num_blocks + 1, self.block_size, self.cache_dtype, self.device)
        self.inputs = StepInputs(self.cache, self.device, self.paged_kernel, self.deterministic, self.attention_kernel)
        """Builds an eager step's inputs."""
        self.max_num_seqs = config.max_num_seqs
        self.plausible_contrasts = config.plausible_contrasts_on(self.device.type)
        """Contrast rows with a plausibility mask get their plausible tokens' logits only (:meth:`run_deferring`)."""
        logger.info(
            "contrast rows' logits (--contrast-logits %s): %s",
            config.contrast_logits,
            "at their plausible tokens only" if self.plausible_contrasts else "the whole vocabulary's",
        )
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.use_decode_graphs(capture=True)
            self._capture_graphs_at_start(config.graph_capture_seconds)

    # ---- sizing -------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _profile(self, num_tokens: int, longest: int, logits_rows: int) -> tuple[int, int]:
        """(peak, now) bytes the CUDA allocator held across a warm-up pass (:meth:`warm_up`)."""
        return allocator_peak(self.device, lambda: self.warm_up(num_tokens, longest, logits_rows))

    @torch.inference_mode()
    def warm_up(self, num_tokens: int, longest: int, logits_rows: int) -> None:
        """One forward pass of the largest step (:func:`~amulet_core.engine.warm_up.largest_step`), to measure its
        activations, and the float32 log-probabilities of ``logits_rows`` of its tokens; its cache freed after."""
        batch, positions = largest_step(
            self.kv_shape, self.block_size, self.cache_dtype, self.device, self.deterministic, num_tokens, longest
        )
        keep = self._tensor(list(range(max(0, num_tokens - logits_rows), num_tokens)))
        with self._ops():
            ids = torch.zeros(1, num_tokens, dtype=torch.long, device=self.device)
            logits = self.forward(ids, self._tensor(positions).unsqueeze(0), keep, batch)
        torch.log_softmax(logits[0].float(), dim=-1)
        del batch, logits

    def _paged_kernel_on(self, config: EngineConfig) -> bool:
        """Whether decode rows get the paged decode kernel: ``--attention-backend`` resolved for the device; ``auto``
        first checks the kernel against SDPA on it (:func:`kernel_probe`) and falls back to SDPA if it fails."""
        if attention_backend(config.attention_backend, self.device) != "triton":
            return False
        if config.attention_backend == "auto" and (problem := kernel_probe(self.device, self.dtype)) is not None:
            logger.warning("the paged decode kernel failed its start-up check (%s); decode attention uses SDPA", problem)
            return False
        return True

    def _attention_in_words(self) -> str:
        if self.deterministic:
            how = "its compiled fixed-order kernel" if self.attention_kernel else "torch operations"
            return f"batch-invariant (--deterministic), through {how}"
        return "the paged decode kernel (Triton)" if self.paged_kernel else "SDPA over each row's gathered context"

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps padded to fixed-shape buckets: replayed from CUDA graphs with
        ``capture`` (a CUDA device), else eagerly (any device; what the CPU tests check padding with)."""
        vocab = logits_width(self.model)
        sizes = (self.scratch_block, vocab, self.max_num_seqs, self.max_model_len)
        self.graphs = DecodeGraphs(
            self.forward, self.cache, *sizes, self.device, capture, self.invariant_weights, self.paged_kernel,
            self.attention_kernel,
        )  # fmt: skip

    @torch.inference_mode()
    def _capture_graphs_at_start(self, budget_s: float) -> None:
        """Capture the decode graphs within ``budget_s`` seconds (:meth:`DecodeGraphs.capture_at_start`), with a log
        line; a capture that fails leaves every decode step eager, as one failing on first use does."""
        graphs = self.graphs
        if graphs is None or budget_s <= 0:
            return
        started = time.perf_counter()
        try:
            captured = graphs.capture_at_start(budget_s)
        except Exception:  # out of memory, an op graphs cannot hold: requests must still be served
            logger.exception("capturing decode graphs at start-up failed; decode steps run eagerly from now on")
            self.graphs = None
            return
        buckets = len(graphs.batch_sizes) * len(graphs.context_lens)
        total = buckets * (1 + len(START_TAIL_VARIANTS))
        logger.info(
            "decode graphs: %d of %d captured at start-up (%d buckets, each alone and with %d variants of the tail) in "
            "%.1f s (--graph-capture-seconds %g); the rest on first use",
            captured, total, buckets, len(START_TAIL_VARIANTS), time.perf_counter() - started, budget_s,
        )  # fmt: skip

    def _ops(self) -> AbstractContextManager[object]:
        """The context a forward pass runs in: batch-invariant linear layers and activations when deterministic."""
        return batch_invariant(self.invariant_weights) if self.deterministic else nullcontext()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A flat Python list of ints on the device, in one copy."""
        return to_device(values, self.device, torch.long)

    @torch.inference_mode()
    def run_with_tail(
        self,
        chunks: list[ScheduledChunk],
        logits_for: list[Sequence],
        specs: list[RowSpec],
        params: list[SamplingParams],
        histories: list[TailHistory],
        pending: PendingTokens | None,
        masks: GrammarMasks | None = None,
    ) -> DeviceSamples | None:
        """A decode-only step through the decode graphs with the requests' method and choice of tokens inside
        (:mod:`amulet_core.engine.decode_tail`): their choices (with ``params``), on the device. ``specs`` number the
        rows of ``logits_for``, as :meth:`run`'s logits; ``histories``: what their processors read; ``masks``: the grammar
        masks of some of them (numbered as ``specs``). None, having run
        nothing, when the step cannot be replayed (a prefill chunk, no bucket that holds it, no graphs) or its rows
        do not fit the tail (:meth:`~amulet_core.engine.decode_tail.DecodeTail.problem`); :meth:`run` then runs it."""
        graphs = self.graphs
        if graphs is None or not self.tail_replayable(chunks):
            return None
        if self._replay(chunks, logits_for, pending, (specs, params, histories), masks) is None:
            return None
        return graphs.tail.samples() if graphs.tail_enabled else None  # (the tail failed: run() reads the logits)

    @torch.inference_mode()
    def launch_forward(self, chunks: list[ScheduledChunk], pending: PendingTokens | None) -> LaunchedForward | None:
        """A decode-only step's forward pass through the decode graphs, its choices left for later
        (:meth:`choose_after`: the tail alone, once the host has made what depends on the tokens of the step in flight,
        which this one reads on the device). None, having run nothing, when the step cannot be replayed with the tail."""
        graphs, bucket = self.graphs, self._bucket(chunks)
        if graphs is None or bucket is None or not graphs.tail_enabled:
            return None
        try:
            graphs.run(chunks, bucket, pending)
        except Exception:
            logger.exception("decode graph %s failed; decode steps run eagerly from now on", bucket)
            self.graphs = None
            return None
        return LaunchedForward(graphs, bucket[0], {id(c.seq): i for i, c in enumerate(chunks)})

    @torch.inference_mode()
    def choose_after(
        self,
        launched: LaunchedForward,
        logits_for: list[Sequence],
        specs: list[RowSpec],
        params: list[SamplingParams],
        histories: list[TailHistory],
        masks: GrammarMasks | None = None,
    ) -> DeviceSamples | None:
        """The choices of :meth:`launch_forward`'s step for the requests of ``specs`` (numbering the rows of
        ``logits_for``, sequences of that step), by the tail alone; None when the tail cannot hold them or has failed
        (:meth:`logits_after` then gives their logits to choose from)."""
        order = [launched.rows[id(seq)] for seq in logits_for]
        try:
            launched.graphs.run_tail(launched.size, tail_rows(specs, order, params, histories), masks)
        except TailRowsError:
            return None
        return launched.graphs.tail.samples() if launched.graphs.tail_enabled else None

    def logits_after(self, launched: LaunchedForward, logits_for: list[Sequence]) -> torch.Tensor:
        """Float32 logits of ``logits_for``'s rows of :meth:`launch_forward`'s step, in that order."""
        return launched.graphs.logits.index_select(0, self._tensor([launched.rows[id(seq)] for seq in logits_for]))

    def tail_replayable(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether a step of ``chunks`` can replay the decode graphs with the tail (checked before its requests'
        rows are worked out: a step with a prefill chunk has no use for them)."""
        return self.graphs is not None and self.graphs.tail_enabled and self._bucket(chunks) is not None

    def _bucket(self, chunks: list[ScheduledChunk]) -> tuple[int, int] | None:
        """The decode graphs' bucket of a decode-only step; None for a step they cannot replay."""
        graphs = self.graphs
        if graphs is None or not chunks or any(c.num_tokens != 1 for c in chunks):
            return None
        return graphs.bucket(len(chunks), max(c.start for c in chunks) + 1)

    def _replay(
        self,
        chunks: list[ScheduledChunk],
        logits_for: list[Sequence],
        pending: PendingTokens | None,
        requests: tuple[list[RowSpec], list[SamplingParams], list[TailHistory]] | None = None,
        masks: GrammarMasks | None = None,
    ) -> torch.Tensor | None:
        """A decode-only step through the decode graphs: the logits of ``logits_for``'s rows, in chunk order (and, with
        ``requests``' specs, sampling parameters and histories, the tail's choices for them). None, having run
        nothing, when it cannot be replayed (a prefill chunk, no bucket that holds it, no graphs), or when the graph
        failed (every later step is then eager: a capture that fails, out of memory or an op graphs cannot hold, must
        not fail requests)."""
        graphs, bucket = self.graphs, self._bucket(chunks)
        if graphs is None or bucket is None:
            return None
        row = {id(c.seq): i for i, c in enumerate(chunks)}
        order = [row[id(seq)] for seq in logits_for]
        tail = None if requests is None else tail_rows(requests[0], order, requests[1], requests[2])
        try:
            logits = graphs.run(chunks, bucket, pending, tail, masks)
        except TailRowsError:
            return None  # nothing ran: the host's choice then fails the requests it must, and the graphs stay
        except Exception:
            logger.exception("decode graph %s failed; decode steps run eagerly from now on", bucket)
            self.graphs = None
            return None
        return logits if tail is not None else logits.index_select(0, self._tensor(order))

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], logits_for: list[Sequence], pending: PendingTokens | None = None) -> torch.Tensor:
        """One forward pass over all chunks; float32 logits ``[len(logits_for), vocab]`` of each
        listed sequence's last scheduled token, in that order: replayed from the decode graphs where the step allows
        it, else eagerly over :class:`~amulet_core.engine.step_inputs.StepInputs` (a sequence's last token may be
        :data:`PENDING_TOKEN`, sampled by the step still in flight: it is taken from ``pending``'s device tensor, on
        the device)."""
        decode_chunks, prefill_chunks = _split(chunks)
        if not prefill_chunks and (replayed := self._replay(decode_chunks, logits_for, pending)) is not None:
            return replayed
        ids, positions, keep, batch = self.inputs.build(decode_chunks, prefill_chunks, logits_for, pending)
        with self._ops():
            logits = self.forward(ids.unsqueeze(0), positions.unsqueeze(0), keep, batch)
        return logits[0].float()

    @torch.inference_mode()
    def run_deferring(
        self, chunks: list[ScheduledChunk], logits_for: list[Sequence], deferred: list[int], pending: PendingTokens | None
    ) -> tuple[torch.Tensor, DeferredContrasts | None]:
        """:meth:`run`, with the rows ``deferred`` of ``logits_for`` (contrast rows with a plausibility mask) left undone
        where the runner may (``plausible_contrasts``; the family forward, an output layer that computes some tokens,
        an eager step): their logits are NaN and the returned :class:`DeferredContrasts` computes them on demand."""
        forward = self.forward
        outputs = outputs_at(forward.head) if isinstance(forward, LlamaFamilyForward) else None
        decode_chunks, prefill_chunks = _split(chunks)
        eager = bool(prefill_chunks) or self._bucket(chunks) is None
        if not (deferred and self.plausible_contrasts and eager and outputs is not None):
            return self.run(chunks, logits_for, pending), None
        assert isinstance(forward, LlamaFamilyForward) and outputs is not None
        inputs = self.inputs.build(decode_chunks, prefill_chunks, logits_for, pending)
        with self._ops():
            return forward_deferring(forward, outputs, inputs, len(logits_for), deferred)


def _split(chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
    """A step's decode chunks (one token each) and prefill chunks, in order."""
    return [c for c in chunks if c.num_tokens == 1], [c for c in chunks if c.num_tokens > 1]
