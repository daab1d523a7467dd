"""The batched sampler against the per-row one (``choose_token``): same tokens for the same seeds and histories."""

from __future__ import annotations

import random

import pytest
import torch

from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import RowHistory
from amulet_core.sampling.sampler import choose_token, make_generator, sample_tokens

VOCAB = 2_000


def random_processors(rng: random.Random) -> dict:
    """A random mix of the logits processors (often none, often several)."""
    if rng.random() < 0.3:
        return {}
    out: dict = {}
    if rng.random() < 0.5:
        out["presence_penalty"] = rng.choice([-2.0, -0.5, 0.5, 2.0, rng.uniform(-2, 2)])
    if rng.random() < 0.5:
        out["frequency_penalty"] = rng.choice([-1.0, 0.3, 2.0, rng.uniform(-2, 2)])
    if rng.random() < 0.5:
        out["repetition_penalty"] = rng.choice([0.5, 1.1, 1.5, 3.0, rng.uniform(0.1, 5)])
    if rng.random() < 0.4:
        out["min_p"] = rng.choice([0.01, 0.05, 0.3, 1.0, rng.random()])
    if rng.random() < 0.4:
        out["logit_bias"] = tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(VOCAB), rng.randrange(1, 30)))
    if rng.random() < 0.3:
        out["min_tokens"] = rng.randrange(1, 5)
    return out


def random_params(rng: random.Random, row: int) -> SamplingParams:
    kind = rng.choice(["greedy", "plain", "top_k", "top_p", "both"])
    processors = random_processors(rng)
    if kind == "greedy":
        return SamplingParams(
            temperature=rng.choice([0, 1e-6]), logprobs=rng.random() < 0.3, top_logprobs=rng.randrange(4), **processors
        )
    return SamplingParams(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.3, 2.0, rng.uniform(0.05, 3.0)]),
        top_k=rng.choice([1, 2, 5, 50, VOCAB, VOCAB + 7]) if kind in ("top_k", "both") else 0,
        top_p=rng.choice([1e-6, 0.1, 0.5, 0.9, 0.99, rng.uniform(0.01, 1.0)]) if kind in ("top_p", "both") else 1.0,
        seed=None if rng.random() < 0.1 else 1000 + row,
        logprobs=rng.random() < 0.3,
        top_logprobs=rng.randrange(6),
        **processors,
    )


def random_history(rng: random.Random, logprobs: torch.Tensor) -> RowHistory | None:
    """Generated ids that favour the row's likely tokens (so penalties change choices), a prompt, stop ids."""
    if rng.random() < 0.15:
        return None
    likely = torch.topk(logprobs, 10).indices.tolist()
    output = [rng.choice(likely) if rng.random() < 0.6 else rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))]
    prompt = [rng.choice(likely) if rng.random() < 0.3 else rng.randrange(VOCAB) for _ in range(rng.randrange(0, 40))]
    stop = set(rng.sample(likely, rng.randrange(0, 4))) | {rng.randrange(VOCAB), VOCAB + 3}  # an id past the vocabulary
    return RowHistory(output, prompt, frozenset(stop))


def random_logprobs(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g) * torch.rand(rows, 1, generator=g).mul(6).add(0.2)
    logits[:, :50] = logits[:, :50].round()  # ties
    logits[0, 5:40] = float("-inf")  # impossible tokens
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("trial", range(12))
def test_batched_sampling_equals_per_row_sampling(trial):
    rng = random.Random(trial)
    rows = rng.randrange(1, 48)
    params = [random_params(rng, r) for r in range(rows)]
    logprobs = random_logprobs(rows, trial)
    histories = [random_history(rng, logprobs[i]) for i in range(rows)]
    batched_gens = [make_generator(p) for p in params]
    row_gens = [make_generator(p) for p in params]
    for step in range(3):  # the generators advance over steps, as in decoding
        torch.manual_seed(99 + step)  # unseeded rows draw from the global generator, in row order
        got = sample_tokens(logprobs, params, batched_gens, histories)
        torch.manual_seed(99 + step)
        want = [choose_token(logprobs[i], p, row_gens[i], histories[i]) for i, p in enumerate(params)]
        assert [r.token for r in got] == want, (trial, step)
        for i, (r, p) in enumerate(zip(got, params, strict=True)):
            assert r.error is None
            assert r.logprob == float(logprobs[i, r.token])  # the method's log-probability, before the processors
            n = p.top_logprobs if p.logprobs else 0
            values = torch.topk(logprobs[i], n).values if n else torch.empty(0)
            assert [v for _, v in r.top] == values.tolist()  # ties may come in another order: check the ids' values
            assert len({t for t, _ in r.top}) == n and all(float(logprobs[i, t]) == v for t, v in r.top)
            history = histories[i]
            if history is not None:
                history.output_ids.append(r.token)  # type: ignore[attr-defined] (a list, as the engine's)


def test_the_processors_change_the_choices_of_the_random_mixes():
    """The oracle comparison above is only worth something if the processors act: count changed tokens."""
    rng = random.Random(0)
    changed = 0
    for trial in range(4):
        logprobs = random_logprobs(40, 100 + trial)
        for i in range(40):
            p = SamplingParams(temperature=0, **random_processors(rng))
            history = random_history(rng, logprobs[i])
            got = sample_tokens(logprobs[i : i + 1], [p], [None], [history])[0]
            changed += got.token != int(logprobs[i].argmax())
    assert changed >= 20


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    logprobs = random_logprobs(9, 5)
    mine = SamplingParams(temperature=1.2, top_p=0.9, seed=7)
    alone = [sample_tokens(logprobs[4:5], [mine], [make_generator(mine)])[0].token]
    others = [SamplingParams(temperature=1.0, seed=s) for s in range(8)]
    params = others[:4] + [mine] + others[4:]
    gens = [make_generator(p) for p in params]
    together = sample_tokens(logprobs, params, gens)
    assert together[4].token == alone[0]


def test_greedy_rows_take_the_argmax_and_ties_the_first():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]]), dim=-1)
    got = sample_tokens(logprobs, [SamplingParams(temperature=0)] * 2, [None, None])
    assert [r.token for r in got] == [1, 0]


def test_a_row_without_a_finite_distribution_fails_alone():
    logprobs = random_logprobs(3, 1)
    logprobs[1] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=1)] * 3
    gens = [make_generator(p) for p in params]
    got = sample_tokens(logprobs, params, gens)
    assert got[1].error is not None and got[0].error is None and got[2].error is None
    with pytest.raises(ValueError):
        choose_token(logprobs[1], params[1], make_generator(params[1]))


def test_float32_combination_matches_the_float64_closed_form():
    from amulet_core.method.combination import combine_contexts_float32
    from amulet_core.method.settings import combine_contexts

    g = torch.Generator().manual_seed(3)
    pref = torch.randn(16, VOCAB, generator=g) * 4
    base = pref + torch.randn(16, VOCAB, generator=g)
    pref[0, :10] = float("-inf")
    base[1, 10:20] = float("-inf")
    base[2, :5] = pref[2, :5] = float("-inf")
    for a in (5.6487, 3.0, 1.0, 0.5, -1.0):
        exact = combine_contexts(pref.double(), base.double(), [a] * 16)
        fast = combine_contexts_float32(pref, base, torch.full((16, 1), a))
        assert torch.equal(torch.isneginf(fast), torch.isneginf(exact))
        finite = torch.isfinite(exact)
        assert torch.allclose(fast.double()[finite], exact[finite], atol=1e-4)
        assert torch.equal(fast.argmax(-1), exact.argmax(-1))


def test_the_in_place_plausibility_mask_equals_the_methods_one():
    from amulet_core.method.combination import plausibility_mask as in_place_mask
    from amulet_core.method.settings import plausibility_mask

    g = torch.Generator().manual_seed(4)
    pref = torch.randn(8, VOCAB, generator=g) * 3
    mixed = torch.log_softmax(torch.randn(8, VOCAB, generator=g) * 3, dim=-1)
    betas = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 1e-3, 0.0, 0.2])
    want = plausibility_mask(mixed.clone(), pref, betas)
    got = in_place_mask(mixed.clone(), pref, betas)
    assert torch.equal(got, want)
