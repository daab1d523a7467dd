"""The weights of an 8B-shaped model in each ``--quantization`` format, and the KV room they leave in 24 GiB:
``python -m benchmarks.quantization_memory`` (a Markdown table, and JSON).

The model is Llama 3.1 8B's shape (a config, built on the meta device: no weights, no download). Each linear
layer but the output one is sized as :mod:`amulet_core.model.quantization` allocates it
(:func:`~amulet_core.model.quantization.layer_bytes`, checked against the real layers by
``tests/core/model/test_quantization.py``); embeddings, output layer and norms stay bfloat16. The KV room is what
is left of 24 GiB (a 24 GB card at ``--gpu-memory-utilization`` 0.9, or a 24 GiB machine's RAM at the same share)
once the weights are in, activations not counted; tokens are that room over the KV bytes a token takes (bfloat16
keys and values of every layer), and an ``amulet`` conversation holds two contexts of its length (the preference
one and the contrast one, :data:`~amulet_core.engine.memory.FULL_CONTEXTS`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from amulet_core.engine.memory import FULL_CONTEXTS, GPU_MEMORY_UTILIZATION
from amulet_core.engine.paged_attention import PagedKVCache
from amulet_core.model.quantization import layer_bytes
from benchmarks.report import write_report

GIB = 1 << 30
BUDGET_GIB = 24 * GPU_MEMORY_UTILIZATION
LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
}  # fmt: skip
FORMATS = ("none", "int8", "int4")
CONVERSATION = 4096
"""Tokens of the conversation whose count the table gives (prompt and answer)."""


def eight_b_model() -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_8B), dtype=torch.bfloat16)


def sizes(model: Any, method: str) -> dict[str, int]:
    """(decoder linear bytes, all weight bytes) of ``model`` in ``method``."""
    output = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    decoder = sum(layer_bytes(m.out_features, m.in_features, method) for m in linear)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    rest = dense - sum(m.weight.numel() * m.weight.element_size() for m in linear)
    return {"decoder_linear": decoder, "weights": decoder + rest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/quantization_memory.json")
    args = parser.parse_args(argv)
    model = eight_b_model()
    config = LLAMA_8B
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = PagedKVCache.bytes_per_token(config["num_hidden_layers"], config["num_key_value_heads"], head_dim, torch.bfloat16)
    rows: list[dict[str, Any]] = []
    print(f"| 8B-shaped (Llama 3.1) | decoder linear weights | all weights | KV room in {BUDGET_GIB:.1f} GiB | KV tokens | "
          f"`amulet` conversations of {CONVERSATION} tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for method in FORMATS:
        found = sizes(model, method)
        room = BUDGET_GIB * GIB - found["weights"]
        tokens = max(0, int(room // per_token))
        conversations = tokens // (FULL_CONTEXTS * CONVERSATION)
        rows.append({"format": method, **found, "kv_room": room, "kv_tokens": tokens, "conversations": conversations})
        print(f"| `{method}` | {found['decoder_linear'] / GIB:.2f} GiB | {found['weights'] / GIB:.2f} GiB | "
              f"{room / GIB:.2f} GiB | {tokens:,} | {conversations} |")  # fmt: skip
    meta = {"shape": LLAMA_8B, "budget_gib": BUDGET_GIB, "kv_bytes_per_token": per_token, "conversation": CONVERSATION}
    write_report(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
