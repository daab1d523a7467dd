"""Small host-made tensors for a device, copied without making the host wait.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and PyTorch makes such a copy synchronous:
the host waits until every kernel queued before it on the stream has run. Between two decode steps that is the
whole forward pass, so a step that builds its inputs, its method coefficients or its sampling parameters that way
cannot overlap its host work with the device's (:mod:`amulet_core.engine.overlap`). These helpers stage the values
in pinned memory (PyTorch's caching host allocator keeps each staging block until its copy has run) and copy them
asynchronously. On any other device they are ``torch.tensor`` and ``Tensor.to`` themselves.
"""

from __future__ import annotations

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
