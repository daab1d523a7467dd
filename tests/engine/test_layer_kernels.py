"""The family forward's norms and rotations as compiled calls (amulet_core/engine/layer_kernels.py,
amulet_core/native/layer_ops.c): torch's bits on rows of many sizes, one row and many, with and without the residual
addition, threaded or not; the rotation's bits and layout; the width check at load; torch's operations where the
kernels do not apply; and the served engine running them. (The whole forward's bits against transformers' with
the kernels in place: tests/engine/test_packed_forward.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from amulet_core.engine import layer_kernels
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.layer_kernels import (
    LayerKernels,
    TorchLayerOps,
    layer_ops_for,
    load_layer_kernels,
    torch_rms_norm,
    torch_rotate,
)
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.packed_forward import LlamaFamilyForward
from amulet_core.native import build


class Norm:
    """An RMSNorm's weight and epsilon, as the family's modules hold them."""

    def __init__(self, n: int, seed: int = 0, eps: float = 1e-5) -> None:
        self.weight = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        self.variance_epsilon = eps


@pytest.fixture(scope="module")
def kernels() -> LayerKernels:
    found, why = load_layer_kernels((576, 64))
    if found is None:
        pytest.fail(why)
    return found


@pytest.mark.parametrize("n", [8, 64, 100, 576, 960, 1000, 2048, 4097, 5120])
@pytest.mark.parametrize("rows", [1, 2, 7, 130])
def test_norms_give_torchs_bits(kernels, n, rows):
    """Sizes under and over a level of torch's cascade (16 and 256 additions of four vectors), with a part vector at
    the end, one row and many (130 x 5120: over the threading threshold)."""
    gen = torch.Generator().manual_seed(n * 1000 + rows)
    norm = Norm(n, seed=n)
    for scale in (1e-3, 1.0, 300.0):
        x = torch.randn(1, rows, n, generator=gen) * scale
        residual = torch.randn(1, rows, n, generator=gen) * scale
        hidden, alone = kernels.add_norm(norm, x)
        assert hidden is x and torch.equal(alone, torch_rms_norm(norm, x))
        hidden, fused = kernels.add_norm(norm, x, residual)
        want = residual + x
        assert torch.equal(hidden, want) and torch.equal(fused, torch_rms_norm(norm, want))


def test_norms_give_torchs_bits_on_any_number_of_threads(kernels):
    norm = Norm(576)
    x = torch.randn(1, 200, 576)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kernels.add_norm(norm, x, x)[1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], torch_rms_norm(norm, x + x))


def test_a_row_has_the_same_bits_alone_and_among_others(kernels):
    norm = Norm(576)
    x = torch.randn(1, 9, 576)
    together = kernels.add_norm(norm, x)[1]
    for row in range(9):
        assert torch.equal(kernels.add_norm(norm, x[:, row : row + 1].contiguous())[1], together[:, row : row + 1])


@pytest.mark.parametrize("d", [16, 64, 128, 80, 9])
def test_rotations_give_torchs_bits_and_layout(kernels, d):
    """A fused projection's queries and keys (heads side by side in each row, transposed) and a separate
    projection's heads; an odd head dim rolls by its larger half."""
    gen = torch.Generator().manual_seed(d)
    tokens, heads = 5, 6
    cos, sin = torch.randn(2, 1, 1, tokens, d, generator=gen)
    fused = torch.randn(1, tokens, (heads + 2) * d, generator=gen)  # two more heads' values after them
    for x in (
        fused[..., : heads * d].view(1, tokens, heads, d).transpose(1, 2),
        fused[..., : heads * d].view(1, tokens, heads, d).transpose(1, 2)[:, :1],
    ):
        got, want = kernels.rotate(x, cos, sin), torch_rotate(x, cos, sin)
        assert torch.equal(got, want) and got.stride() == want.stride()


def test_a_width_other_than_torchs_is_refused(kernels):
    """The lanes decide the order of the norm's sum: another width gives other bits on some rows, and the check
    at load sees it."""
    other = LayerKernels(kernels.library, 16 if kernels.width == 8 else 8)
    assert not layer_kernels._same_bits(other, 576)
    norm = Norm(576)
    x = torch.randn(1, 64, 576) * 10
    assert not torch.equal(other.add_norm(norm, x)[1], torch_rms_norm(norm, x))


def test_tensors_the_kernels_do_not_read_get_torchs_operations(kernels, monkeypatch):
    def refused(*args):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(kernels, "_norm", refused)
    monkeypatch.setattr(kernels, "_rotate", refused)
    norm = Norm(64)
    x = torch.randn(1, 3, 64)
    for tensor, weight_norm in (
        (x.bfloat16(), Norm(64)),  # bfloat16 rows
        (torch.randn(1, 64, 3).transpose(1, 2), norm),  # not contiguous
        (torch.randn(1, 3, 4), Norm(4)),  # shorter than a vector
    ):
        hidden, out = kernels.add_norm(weight_norm, tensor)
        assert torch.equal(out, torch_rms_norm(weight_norm, tensor))
    residual = torch.randn(1, 64, 3).transpose(1, 2)  # x's shape, not contiguous
    assert torch.equal(kernels.add_norm(norm, x, residual)[1], torch_rms_norm(norm, residual + x))
    cos, sin = torch.randn(2, 1, 1, 3, 16)
    contiguous = torch.randn(1, 2, 3, 16)  # heads not side by side in a row
    assert torch.equal(kernels.rotate(contiguous, cos, sin), torch_rotate(contiguous, cos, sin))
    assert torch.equal(
        kernels.rotate(contiguous.bfloat16(), cos.bfloat16(), sin.bfloat16()),
        torch_rotate(contiguous.bfloat16(), cos.bfloat16(), sin.bfloat16()),
    )


def test_only_a_cpu_in_float32_gets_the_kernels(monkeypatch, caplog):
    assert isinstance(layer_ops_for(torch.device("cpu"), torch.float32, (64,)), LayerKernels)
    assert type(layer_ops_for(torch.device("cpu"), torch.bfloat16, (64,))) is TorchLayerOps
    assert type(layer_ops_for(torch.device("cuda"), torch.float32, (64,))) is TorchLayerOps
    monkeypatch.setattr(build, "COMPILERS", ("no-such-compiler-here",))
    monkeypatch.delenv("CC", raising=False)
    with caplog.at_level(logging.WARNING):
        assert type(layer_ops_for(torch.device("cpu"), torch.float32, (64,))) is TorchLayerOps
    assert "no C compiler" in caplog.text


@pytest.mark.smollm
def test_the_served_model_runs_the_kernels(smollm, caplog):
    """The embedded SmolLM2 in float32 (as ``--dtype auto`` loads it on a CPU without native bfloat16): the
    engine's family forward has the kernels and says so."""
    with caplog.at_level(logging.INFO):
        engine = LLMEngine(smollm, EngineConfig(max_model_len=256, kv_cache_tokens=512))
    forward = engine.runner.forward
    assert isinstance(forward, LlamaFamilyForward) and isinstance(forward.ops, LayerKernels)
    assert "norms and rotations: one compiled call each" in caplog.text
