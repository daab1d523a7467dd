"""The forward every quantized linear layer shares: the input as rows of ``in_features`` in the kernel's dtype, the
kernel's product, the result in the input's dtype with the bias added, in the input's shape."""

from __future__ import annotations

import torch
from torch import nn


class RowwiseLinear(nn.Module):
    """An ``nn.Linear`` whose product a kernel computes on ``[n, in_features]`` rows of :attr:`compute_dtype`
    (:meth:`product`); subclasses set ``in_features``, ``out_features`` and ``bias``."""

    compute_dtype: torch.dtype = torch.float32
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (``[n, in_features]``, :attr:`compute_dtype`, contiguous) times the weight: ``[n, out_features]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != self.compute_dtype:
            rows = rows.to(self.compute_dtype)
        out = self.product(rows.contiguous())
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)
