"""The 8-bit output layer (amulet_core/model/q8_output.py): a Q8_0 weight's codes and scales recovered exactly
from its float32 dequantization (and nothing else taken for one), the compiled kernel's product against float64,
a row's bits among any rows and threads, the served SmolLM2's output layer replaced with the same greedy answer,
and a machine without a compiler keeping the dense layer."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

from amulet_core.model.chat_template import render_chat
from amulet_core.model.q8_output import Q8Linear, q8_blocks, q8_output_layer
from amulet_core.native import build
from amulet_core.native.build import load_library


def q8_0(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, codes, scales) as GGUF's Q8_0 stores and transformers dequantizes: per block of 32, a float16 scale
    and int8 codes whose largest magnitude is 127; the weight their float32 products."""
    generator = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    codes = torch.randint(-126, 127, (out_features, blocks, 32), generator=generator, dtype=torch.int8)
    top = torch.randint(0, 32, (out_features, blocks, 1), generator=generator)
    sign = torch.where(torch.rand(out_features, blocks, 1, generator=generator) < 0.5, -127, 127).to(torch.int8)
    codes.scatter_(-1, top, sign)
    scales = (torch.rand(out_features, blocks, generator=generator) * 0.02 + 1e-4).half().float()
    weight = codes.float() * scales.unsqueeze(-1)
    return weight.view(out_features, in_features), codes.view(out_features, in_features), scales


@pytest.fixture(scope="module")
def library():
    found, why = load_library(build.SOURCES / "q8_linear.c")
    if found is None:
        pytest.fail(why)
    return found


def test_the_codes_and_scales_of_a_q8_0_weight_are_recovered_exactly():
    weight, codes, scales = q8_0(48, 96)
    found = q8_blocks(weight)
    assert found is not None
    assert torch.equal(found[0], codes) and torch.equal(found[1], scales)


def test_a_weight_that_is_not_8_bit_is_left_alone():
    weight, _, _ = q8_0(16, 64)
    assert q8_blocks(torch.randn(16, 64)) is None
    assert q8_blocks(weight.to(torch.bfloat16)) is None  # its products rounded: no longer exact
    assert q8_blocks(weight[:, :40].contiguous()) is None  # not whole blocks
    nudged = weight.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(1.0))
    assert q8_blocks(nudged) is None  # one bit off one weight


def test_the_8_bit_layer_computes_the_product(library):
    weight, codes, scales = q8_0(64, 128, seed=1)
    layer = Q8Linear(codes, scales, library)
    x = torch.randn(2, 3, 128)
    got = layer(x)
    assert got.shape == (2, 3, 64) and got.dtype == torch.float32
    wanted = x.double() @ weight.double().T
    torch.testing.assert_close(got.double(), wanted, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x.to(torch.bfloat16)), layer(x.to(torch.bfloat16).float()))  # any input: as float32


@pytest.mark.parametrize("outputs", [64, 40])  # whole tiles of 32 outputs, and a last tile of one group of 8
def test_a_row_has_the_same_bits_among_any_rows_and_at_any_thread_count(library, outputs):
    _, codes, scales = q8_0(outputs, 96, seed=2)
    layer = Q8Linear(codes, scales, library)
    x = torch.randn(7, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
        together = layer(x)
        torch.set_num_threads(2)
        threaded = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, together) and torch.equal(alone, threaded)


def test_some_outputs_of_a_row_have_the_bits_of_the_whole_row(library):
    """``outputs_at``: the outputs asked for, in the order asked (unsorted, repeated, several in one group of eight,
    the first and the last), each with the bits the whole layer gives it; an output out of range is refused."""
    _, codes, scales = q8_0(64, 96, seed=4)
    layer = Q8Linear(codes, scales, library)
    x = torch.randn(3, 96)
    whole = layer(x)
    wanted = [63, 0, 9, 8, 15, 9, 40, 7]
    for row in range(3):
        got = layer.outputs_at(x[row], wanted)
        assert got.dtype == torch.float32 and torch.equal(got, whole[row, wanted])
    assert layer.outputs_at(x[0], []).shape == (0,)
    with pytest.raises(IndexError):
        layer.outputs_at(x[0], [64])
    with pytest.raises(IndexError):
        layer.outputs_at(x[0], [-1])


def test_the_served_smollm_output_layer_becomes_8_bit_and_answers_alike(smollm):
    """SmolLM2's Q8_0 token embedding, dequantized to float32 by transformers, is recovered exactly: the output
    layer becomes 8-bit, the embeddings keep their float32 weight, and the greedy answer is the dense one's."""
    model = copy.deepcopy(smollm.model)
    dense = model.get_output_embeddings()
    assert q8_output_layer(model) is not None
    head = model.get_output_embeddings()
    assert isinstance(head, Q8Linear) and head.out_features == dense.out_features
    assert model.get_input_embeddings().weight is dense.weight  # the embeddings keep the shared float32 weight
    ids = render_chat(smollm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        hidden = model.model(prompt).last_hidden_state[0]
        torch.testing.assert_close(head(hidden).double(), (hidden.double() @ dense.weight.double().T), atol=1e-4, rtol=0)
        answer = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, len(ids) :]
        wanted = smollm.model.generate(prompt, max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert answer.tolist() == wanted.tolist()


def test_a_copied_or_pickled_layer_computes_alike(library):
    """A deep copy (of a model holding the layer) shares the loaded library; a pickled layer builds it again."""
    _, codes, scales = q8_0(32, 64, seed=3)
    layer = Q8Linear(codes, scales, library)
    x = torch.randn(3, 64)
    copied, unpickled = copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))
    assert copied.library is library and unpickled.library.source == library.source
    assert torch.equal(copied(x), layer(x)) and torch.equal(unpickled(x), layer(x))


def test_without_a_compiler_the_output_layer_stays_dense(smollm, monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build, "COMPILERS", ("no-such-compiler-here",))
    monkeypatch.setenv(build.KERNEL_CACHE_ENV, str(tmp_path))
    model = copy.deepcopy(smollm.model)
    with caplog.at_level(logging.WARNING):
        assert q8_output_layer(model) is None
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert "stays dense" in caplog.text and "no C compiler" in caplog.text
