"""The host's work overlapped with the device's (``EngineConfig.overlap_host``): a step's tokens are read a step later.

Without overlap a step is: schedule, build the inputs, run the forward pass, combine the contexts, sample, then
wait for the device and copy the tokens back, append them, detokenise, check the stops and build the outputs;
the device idles while the host does the first and the last parts, and the host while the device works. With it,
a step whose sampled requests need nothing of the host between two tokens (no grammar, no penalties or
``min_tokens``, no thinking span: :func:`overlappable`) queues its sampling on the device and appends a
placeholder, :data:`PENDING_TOKEN`, to each of their sequences (:meth:`PendingStep.launch`). The next step is
scheduled and launched at once: the runner takes each placeholder's token from the previous step's device tensor
(:class:`PendingTokens`), so the host never waits for it. Only then does the host read the previous step's tokens
(:meth:`PendingStep.read`: its copy has long finished), put them in place of the placeholders, detokenise and
answer, while the device runs the new step (as SGLang's overlap scheduler and vLLM's async scheduling do).

A step with requests whose next step needs their last token on the host (a grammar's mask, a thinking span's
coefficient: :func:`follows_tokens`) is overlapped where the decode graphs choose its tokens: the next step's forward
pass is launched first (its input tokens taken on the device, as above), the host reads and accepts the tokens of
the step in flight while it runs, then makes the masks and rows and launches the tail alone
(:meth:`~amulet_core.engine.model_runner.ModelRunner.launch_forward`, then ``choose_after``), as SGLang overlaps its
grammar masks with the forward pass. On the host path such a step's tokens are read before it samples.

The cost: a request that stops (EOS, a stop string, its length) is known to have stopped a step late, so its row of
the step in flight is computed and dropped. The outputs are the same, token for token (the sampler queues the same
operations in the same order with the same generators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from amulet_core.device_tensors import to_device
from amulet_core.engine.request_state import RequestState
from amulet_core.engine.scheduler import ScheduledChunk
from amulet_core.sampling.sampler import DeviceSamples, RowSample, read_samples

PENDING_TOKEN = -1
"""A sequence's token that was sampled on the device and is not yet read back: never a token id."""


def follows_tokens(state: RequestState) -> bool:
    """Whether the request's next step needs its last token on the host, wherever its tokens are chosen: a grammar
    (its mask follows the accepted token) or a thinking span (its coefficient and grammar follow the tokens)."""
    return state.matcher is not None or state.request.thinking is not None


def overlappable(states: Sequence[RequestState]) -> bool:
    """Whether the requests' next tokens can be chosen on the host without it looking at their last one: none
    :func:`follows_tokens`, or has penalties or ``min_tokens`` (they read the generated ids; the decode graph's tail
    counts the last one on the device)."""
    return all(not follows_tokens(s) and not s.request.sampling.needs_history for s in states)


@dataclass(frozen=True)
class PendingTokens:
    """What the runner needs of the step in flight: ``tokens`` (``[R]``, on the device) and each pending sequence's
    row in it (by ``id(sequence)``)."""

    tokens: torch.Tensor
    rows: dict[int, int]


def pending_places(host_ids: list[int], chunks: list[ScheduledChunk], pending: PendingTokens) -> tuple[list[int], list[int]]:
    """Where ``host_ids`` (the tokens of ``chunks``, packed in their order) holds :data:`PENDING_TOKEN` (only ever a
    sequence's last token, so a chunk's last), and the row of ``pending.tokens`` that holds each one's token."""
    where, rows = [], []
    end = 0
    for chunk in chunks:
        end += chunk.num_tokens
        if host_ids[end - 1] == PENDING_TOKEN:
            where.append(end - 1)
            rows.append(pending.rows[id(chunk.seq)])
    return where, rows


def fill_pending(ids: torch.Tensor, host_ids: list[int], chunks: list[ScheduledChunk], pending: PendingTokens) -> None:
    """Put in ``ids`` (on the device, a copy of ``host_ids``) the tokens of ``pending`` where ``host_ids`` holds
    :data:`PENDING_TOKEN` (:func:`pending_places`), on the device: the host never waits for them."""
    where, rows = pending_places(host_ids, chunks, pending)
    if where:
        index = to_device(where, ids.device, torch.long)
        ids.index_copy_(0, index, pending.tokens.index_select(0, to_device(rows, ids.device, torch.long)))


@dataclass(frozen=True)
class PendingStep:
    """A step whose tokens were chosen on the device and not yet read."""

    states: tuple[RequestState, ...]
    positions: tuple[tuple[int, ...], ...]
    """Where each request's placeholder is in each of its sequences' token ids (their prompts differ in length)."""
    samples: DeviceSamples
    host: torch.Tensor
    """The packed samples' copy on the host (pinned memory on CUDA; the device tensor itself on a CPU)."""
    ready: Any
    """The CUDA event recorded after the copy, or None on a CPU."""
    tokens: PendingTokens

    @classmethod
    def launch(cls, states: Sequence[RequestState], samples: DeviceSamples) -> PendingStep:
        """Start the copy of ``samples`` to the host and give every request's sequences a placeholder."""
        packed = samples.packed
        ready = None
        host = packed
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        positions = []
        rows: dict[int, int] = {}
        for row, state in enumerate(states):
            positions.append(tuple(len(seq.token_ids) for seq in state.group.seqs))
            for seq in state.group.seqs:
                seq.token_ids.append(PENDING_TOKEN)
                rows[id(seq)] = row
        return cls(tuple(states), tuple(positions), samples, host, ready, PendingTokens(samples.tokens, rows))

    def read(self) -> list[RowSample]:
        """The rows' outcomes (waits for the copy, if it has not finished)."""
        if self.ready is not None:
            self.ready.synchronize()
        return read_samples(self.host.tolist(), [s.request.sampling for s in self.states], self.samples.top_n)
