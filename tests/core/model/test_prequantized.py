"""AWQ and GPTQ checkpoints served as they are (issue 29 item 1): the packed codes, zeros and scales of checkpoints
made by AutoAWQ's and AutoGPTQ's own packers (``checkpoints/``, see the ``make_*.py`` scripts there) are read back
to exactly those libraries' own dequantized weights, the loader serves such a checkpoint with int4 layers and no
dense copy, and the variants it cannot serve are refused with a message naming them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import ModelLoadError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model
from amulet_core.model.prequantized import accepted_checkpoint, unpack_awq, unpack_gptq
from amulet_core.model.quantization import INT4_KERNEL, Int4Linear
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain

pytestmark = pytest.mark.skipif(not INT4_KERNEL, reason="this torch has no int4 CPU kernel")
CHECKPOINTS = Path(__file__).with_name("checkpoints")
GROUP = 32
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
CONFIGS = {
    "awq": AWQ_CONFIG,
    "gptq": {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",
    },
}
UNPACK = {"awq": unpack_awq, "gptq": unpack_gptq}


@pytest.fixture(scope="module", params=list(CONFIGS))
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def packed(method) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer name: the library's packed tensors and its own dequantization (``reference``, [in, out])."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(CHECKPOINTS / f"tiny_llama_{method}.safetensors")).items():
        name, _, part = key.rpartition(".")
        layers.setdefault(name, {})[part] = tensor
    return layers


@pytest.fixture(scope="module")
def checkpoint_folder(tiny_model, method, packed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a pre-quantized checkpoint: its decoder's linear weights replaced by packed ones."""
    loaded = tiny_model("llama")
    folder = tmp_path_factory.mktemp(f"{method}-llama")
    model = copy.deepcopy(loaded.model).float()
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for name, parts in packed.items():
        del tensors[f"{name}.weight"]
        tensors |= {f"{name}.{p}": t for p, t in parts.items() if p != "reference"}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": CONFIGS[method]}))
    return folder


def test_the_packed_tensors_unpack_to_the_librarys_own_dequantization(method, packed):
    assert len(packed) == 14
    for name, parts in packed.items():
        codes, zeros = UNPACK[method](parts["qweight"], parts["qzeros"])
        assert codes.shape == parts["reference"].t().shape and int(codes.min()) >= 0 and int(codes.max()) <= 15
        scales = parts["scales"].float().repeat_interleave(GROUP, dim=0)
        weight = (codes.t() - zeros.repeat_interleave(GROUP, dim=0)) * scales  # [in, out]
        assert torch.equal(weight.half(), parts["reference"]), name


def test_the_loader_serves_the_checkpoint_with_int4_layers(method, checkpoint_folder, packed):
    loaded = load_model(ModelConfig(model=str(checkpoint_folder), dtype="float32", model_cache="none"))
    assert loaded.quantization.method == method and loaded.quantization.layers == 14
    layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, Int4Linear)}
    assert set(layers) == set(packed)
    assert not any(isinstance(m, torch.nn.Linear) and ".layers." in n for n, m in loaded.model.named_modules())
    for name, layer in layers.items():  # the layer's product with the identity: its weight, to bfloat16 roundings
        reference = packed[name]["reference"].float()
        got = layer(torch.eye(layer.in_features))
        torch.testing.assert_close(got, reference, atol=0.02 * float(reference.abs().max()), rtol=0)


def test_the_served_model_computes_the_checkpoints_weights(tiny_model, checkpoint_folder, packed):
    """Its logits against the tiny Llama with AutoAWQ's dequantized weights (float32), and an ``amulet`` request
    through the engine."""
    loaded = load_model(ModelConfig(model=str(checkpoint_folder), dtype="float32", model_cache="none"))
    dense = copy.deepcopy(tiny_model("llama").model).float()
    with torch.no_grad():
        for name, parts in packed.items():
            dense.get_submodule(name).weight.copy_(parts["reference"].float().t())
        ids = torch.tensor([[5, 80, 900, 3, 17, 42, 7, 1000]])
        want, got = dense(ids).logits, loaded.model(ids).logits
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0)
    served = LoadedModel(loaded.model, loaded.tokenizer, "awq", loaded.device, loaded.dtype, frozenset({2}), loaded.quantization)
    engine = LLMEngine(served, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    request = GenerationRequest.from_contexts(
        "awq",
        [(5, 80, 900, 3, 17), (5, 80, 900)],
        SamplingParams(max_tokens=6, temperature=0),
        MethodSettings(method=Method.AMULET),
    )
    engine.add_request(request)
    assert sum(len(o.token_ids) for o in drain(engine)["awq"]) == 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_method": "bitsandbytes"}, "serves AWQ and GPTQ \\(4-bit\\) on the CPU, not bitsandbytes"),
        ({"version": "gemv"}, "AWQ version 'gemv' is not served"),
        ({"bits": 8}, "AWQ with 8 bits is not served"),
        ({"group_size": 48}, "AWQ group_size 48 is not served"),
        ({"zero_point": False}, "AWQ without zero points"),
        ({"quant_method": "gptq", "desc_act": True}, "GPTQ with desc_act"),
        ({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, "GPTQ checkpoint_format 'gptq_v2' is not served"),
        ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
    ],
)
def test_a_variant_that_cannot_be_served_is_refused_naming_it(tmp_path: Path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": AWQ_CONFIG | change}))
    with pytest.raises(ModelLoadError, match=message):
        accepted_checkpoint(str(tmp_path), {}, "m", torch.device("cpu"), "auto")


def test_awq_is_refused_on_a_gpu_and_with_another_quantization(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": AWQ_CONFIG}))
    assert accepted_checkpoint(str(tmp_path), {}, "m", torch.device("cpu"), "int4") is not None
    with pytest.raises(ModelLoadError, match="served on the CPU only"):
        accepted_checkpoint(str(tmp_path), {}, "m", torch.device("cuda"), "auto")
    with pytest.raises(ModelLoadError, match="--quantization auto or int4, not int8"):
        accepted_checkpoint(str(tmp_path), {}, "m", torch.device("cpu"), "int8")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert accepted_checkpoint(str(tmp_path), {}, "m", torch.device("cpu"), "auto") is None
