"""benchmarks/step_parts.py: each part of a decode step replaced by zeros of its shape while it is measured, and put
back after; the parts' costs as the whole step less the step without each."""

from __future__ import annotations

import json

import pytest
import torch

from amulet_core.engine import packed_forward as packed_forward_module
from amulet_core.method.settings import Method
from amulet_core.model import quantization
from benchmarks.packed_forward import decoding_engine
from benchmarks.step_parts import PARTS, VARIANTS, main, parts_of, without


def test_a_parts_cost_is_the_whole_step_less_the_step_without_it() -> None:
    ms = {"whole": 40.0, "without_attention": 33.0, "without_int4_products": 26.0, "without_output_layer": 36.5}
    parts = parts_of(ms | {"without_all": 11.0})
    assert parts == {
        "step": 40.0, "attention": 7.0, "int4_products": 14.0, "output_layer": 3.5, "rest": 11.0, "unattributed": 4.5
    }  # fmt: skip


@pytest.mark.smollm
def test_without_replaces_each_part_by_zeros_of_its_shape_and_puts_it_back(smollm) -> None:
    engine = decoding_engine(smollm, Method.BASE, "family", 16)
    forward = engine.runner.forward
    attention, int4, head = packed_forward_module.paged_attention_forward, quantization._INT4_MATMUL, forward.head
    logits: list[torch.Tensor] = []
    run = engine.runner.run

    def recorded(*args, **kwargs):
        out = run(*args, **kwargs)
        logits.append(out.clone())
        return out

    engine.runner.run = recorded  # type: ignore[method-assign]
    engine.step()
    with without(engine, ("output_layer",)):
        engine.step()
    with without(engine, ("attention", "int4_products")):
        assert packed_forward_module.paged_attention_forward is not attention
        assert quantization._INT4_MATMUL is not int4
        assert forward.head is head
        engine.step()
    assert (packed_forward_module.paged_attention_forward, quantization._INT4_MATMUL, forward.head) == (attention, int4, head)
    engine.step()
    whole, no_head, no_layers, again = logits
    assert whole.shape == no_head.shape == no_layers.shape and not torch.equal(whole, no_head)
    assert torch.count_nonzero(no_head) == 0  # the output layer's zeros
    assert torch.count_nonzero(no_layers) > 0 and not torch.equal(no_layers, whole)
    assert torch.count_nonzero(again) > 0


@pytest.mark.smollm
def test_the_benchmark_reports_every_variant_and_part_for_both_methods(tmp_path) -> None:
    out = tmp_path / "step_parts.json"
    main(["--rounds", "1", "--steps", "1", "--cpu-threads", str(torch.get_num_threads()), "--out", str(out)])
    report = json.loads(out.read_text())
    for method in ("base", "amulet"):
        assert set(report[method]["variants_ms"]) == set(VARIANTS)
        assert all(ms > 0 for ms in report[method]["variants_ms"].values())
        assert set(report[method]["parts_ms"]) == {"step", *PARTS, "rest", "unattributed"}
    assert report["meta"]["cpu"]["cores"] >= 1


@pytest.mark.smollm
def test_the_benchmark_decodes_after_a_conversation_when_asked(tmp_path) -> None:
    """``--conversation-tokens``: each engine decodes after a multi-turn conversation of about that size (``amulet``
    with the ``end`` placement), its prompt prefilled."""
    from amulet_core.method.settings import Method
    from benchmarks.packed_forward import served_model
    from benchmarks.step_parts import conversation_engine

    loaded = served_model(torch.get_num_threads())
    for method in (Method.BASE, Method.AMULET):
        engine = conversation_engine(loaded, method, 400, 8, "auto")
        (state,) = engine.requests.values()
        assert 300 <= len(state.request.prompt_ids) <= 500 and len(state.output_ids) >= 1
    out = tmp_path / "step_parts.json"
    main(["--rounds", "1", "--steps", "1", "--conversation-tokens", "300", "--kv-cache-dtype", "float16", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["meta"]["conversation_tokens"] == 300 and report["meta"]["kv_cache_dtype"] == "float16"
    assert all(report[method]["parts_ms"]["step"] > 0 for method in ("base", "amulet"))
