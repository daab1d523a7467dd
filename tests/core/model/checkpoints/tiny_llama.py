"""The decoder layers that the ``make_*.py`` scripts here quantize: the tests' tiny random Llama's (the same seeded
weights as the ``tiny_model("llama")`` fixture), each with an empty float16 layer of its shape to pack into."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tests.engine.device import build_tiny_model


def decoder_linears() -> Iterator[tuple[str, torch.nn.Linear, torch.nn.Linear]]:
    """(name, the model's layer, a float16 layer of its shape without bias) for every decoder linear layer."""
    from transformers import AutoTokenizer

    from amulet_core.model.loading import embedded_model_file

    gguf = embedded_model_file()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = build_tiny_model("llama", tokenizer).model
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            yield name, module, torch.nn.Linear(module.in_features, module.out_features, bias=False).half()
