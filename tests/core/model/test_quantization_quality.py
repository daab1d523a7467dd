"""Quality kept (issue 29 item 3): on the embedded model in bfloat16, each quantization's mean log-likelihood of a
fixed text stays within the stated tolerance of the unquantized model's (``python -m benchmarks.quantization``
prints the figures)."""

from __future__ import annotations

import copy

import pytest
import torch

from amulet_core.model.loading import LoadedModel
from benchmarks.quantization import TOLERANCE, mean_log_likelihood, quantized_copy

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smollm_bf16(smollm) -> LoadedModel:
    model = copy.deepcopy(smollm.model).to(torch.bfloat16)
    return LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, torch.bfloat16, smollm.eos_token_ids)


@pytest.mark.parametrize("method", sorted(TOLERANCE))
def test_the_mean_log_likelihood_of_a_fixed_text_stays_within_tolerance(smollm_bf16, method):
    reference = mean_log_likelihood(smollm_bf16)
    quantized = quantized_copy(smollm_bf16, method)
    assert quantized.quantization.layers == 7 * 30
    delta = mean_log_likelihood(quantized) - reference
    assert abs(delta) < TOLERANCE[method], (method, reference, delta)
    assert delta != 0  # the quantized layers ran (other roundings)
