"""Small host-made tensors for a device, copied without making the host wait.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and PyTorch makes such a copy synchronous:
the host waits until every kernel queued before it on the stream has run. Between two decode steps that is the
whole forward pass, so a step that builds its inputs, its method coefficients or its sampling parameters that way
cannot overlap its host work with the device's (:mod:`amulet_core.engine.overlap`). These helpers stage the values
in pinned memory (PyTorch's caching host allocator keeps each staging block until its copy has run) and copy them
asynchronously. On any other device they are ``torch.tensor`` and ``Tensor.to`` themselves.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def to_device(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``, asynchronously on a CUDA device."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` on ``device``, asynchronously on a CUDA device."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


ALIGN = 16
"""Bytes each staged tensor's start is rounded up to (any element type's alignment)."""


class StagedTensors:
    """Static device tensors that the host sets together before a launch, with one copy (a captured graph's inputs).

    Every tensor is a view of one device buffer, so its address never changes; its twin is a view of a host buffer
    that the host writes (:meth:`host`) before :meth:`commit` queues one copy of the buffer, up to the end of the
    tensors the step set. With ``staged`` (the default on a CUDA device) there are two host buffers (pinned on CUDA),
    used in turn, and one is written again only once its last copy has run (waited for on a CUDA event: by then the
    host has read a later step's tokens, so it does not wait), so the host never changes what a queued copy has yet
    to read. A tensor's values past what a step writes are what its host twin held (valid values, never read).
    Without ``staged`` the host views are the device tensors themselves and :meth:`commit` does nothing.

    ``fields``: name -> (shape, dtype, initial value), in the buffer's order: put a large tensor whose leading rows
    a step uses last, and commit up to those rows (:meth:`commit`'s ``rows``).
    """

    def __init__(
        self,
        fields: dict[str, tuple[tuple[int, ...], torch.dtype, float]],
        device: torch.device,
        staged: bool | None = None,
    ) -> None:
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self._offsets: dict[str, tuple[int, int, int]] = {}
        """name -> (start byte, bytes, bytes of one leading row)."""
        end = 0
        for name, (shape, dtype, _) in fields.items():
            start = -(-end // ALIGN) * ALIGN
            size = math.prod(shape) * dtype.itemsize
            self._offsets[name] = (start, size, size // shape[0] if shape and shape[0] else size)
            end = start + size
        self.nbytes = end
        buffer = torch.zeros(end, dtype=torch.uint8, device=device)
        self.tensors = {name: self._view(buffer, name, shape, dtype) for name, (shape, dtype, _) in fields.items()}
        """The device tensors, by name."""
        pinned = self.staged and device.type == "cuda"
        hosts = [torch.zeros(end, dtype=torch.uint8, pin_memory=pinned) for _ in range(2 if self.staged else 0)]
        self._device_buffer = buffer
        self._hosts = [{name: self._view(h, name, s, d) for name, (s, d, _) in fields.items()} for h in hosts]
        self._host_buffers = hosts
        self._copied: list[Any] = [None] * len(hosts)
        """Per host buffer, the CUDA event after its last copy (None: none queued)."""
        self._turn = 0
        for name, (_, _, value) in fields.items():
            self.tensors[name].fill_(value)
            for views in self._hosts:
                views[name].fill_(value)

    def _view(self, buffer: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        start, size, _ = self._offsets[name]
        return buffer[start : start + size].view(dtype).view(shape)

    def views(self, name: str) -> list[torch.Tensor]:
        """The device tensor ``name`` and its host twins (to give them all the same first values)."""
        return [self.tensors[name], *(views[name] for views in self._hosts)]

    def __getitem__(self, name: str) -> torch.Tensor:
        """The device tensor ``name`` (a graph reads it)."""
        return self.tensors[name]

    def host(self, name: str) -> torch.Tensor:
        """The tensor to write ``name``'s values of the next :meth:`commit` into (the device tensor itself when not
        staged)."""
        if not self.staged:
            return self.tensors[name]
        event = self._copied[self._turn]
        if event is not None:  # its last copy must have run before the host writes it again
            event.synchronize()
            self._copied[self._turn] = None
        return self._hosts[self._turn][name]

    def commit(self, last: str | None = None, rows: int | None = None) -> None:
        """Queue the copy of what the host wrote since the last commit: the whole buffer, or up to the first ``rows``
        leading rows of tensor ``last`` (the tensors after it keep their device values)."""
        if not self.staged:
            return
        end = self.nbytes
        if last is not None:
            start, size, row = self._offsets[last]
            end = start + (size if rows is None else min(size, rows * row))
        source = self._host_buffers[self._turn]
        if self.device.type == "cuda":
            self._device_buffer[:end].copy_(source[:end], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        else:
            self._device_buffer[:end].copy_(source[:end])
        self._turn = 1 - self._turn
