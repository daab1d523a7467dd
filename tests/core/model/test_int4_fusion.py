"""Int4 layers fused into one: the separate layers' bits, one copy of the codes, refused where the packing differs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amulet_core.model.int4_fusion import fuse_int4
from amulet_core.model.quantization import INT4_KERNEL, Int4Linear, int4_linear

pytestmark = pytest.mark.skipif(not INT4_KERNEL, reason="this torch has no int4 CPU kernel")


def int4(outputs: int, inputs: int = 128, bias: bool = False, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    found = int4_linear(nn.Linear(inputs, outputs, bias=bias).to(torch.bfloat16), exact_only=False)
    assert found is not None
    return found[0]


@pytest.mark.parametrize("rows", [1, 2, 7, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_layer_gives_the_separate_layers_outputs_bit_for_bit(rows, bias):
    layers = [int4(128, bias=bias, seed=1), int4(64, bias=bias, seed=2), int4(48, bias=bias, seed=3)]
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    before = [layer(x) for layer in layers]
    fused = fuse_int4(layers)
    assert fused is not None and fused.out_features == 240
    assert torch.equal(fused(x), torch.cat(before, dim=-1))
    for layer, want in zip(layers, before, strict=True):
        assert torch.equal(layer(x), want)  # each layer alone still computes what it did
        assert layer.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()  # one copy


def test_layers_that_do_not_fill_whole_packing_blocks_are_not_fused():
    """The kernel packs 64 output rows a block: a 32-output layer before another would shift the next one's codes."""
    assert fuse_int4([int4(32), int4(64)]) is None


def test_only_int4_layers_of_the_same_inputs_and_biases_are_fused():
    assert fuse_int4([int4(64)]) is None
    assert fuse_int4([int4(64), nn.Linear(128, 64)]) is None
    assert fuse_int4([int4(64), int4(64, inputs=256)]) is None
    assert fuse_int4([int4(64, bias=True), int4(64)]) is None
