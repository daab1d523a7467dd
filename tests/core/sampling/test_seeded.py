"""Seeded draws from a counter-based hash (amulet_core.sampling.seeded): the multinomial's distribution, a function of
(seed, draw number, token id) alone, the same on the host and in the decode graph's tail."""

from __future__ import annotations

import torch

from amulet_core.engine.decode_tail import DecodeTail
from amulet_core.engine.tail_rows import TailHistory, tail_rows
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.sampler import make_generator, sample_on_device
from amulet_core.sampling.seeded import SeededDraws, race_noise, seeded_race

VOCAB = 257


def test_the_draws_follow_the_probabilities():
    """20,000 draws (draw numbers 0..19,999 of one seed) pass a chi-square test against the probabilities (the
    statistic for about 250 degrees of freedom: a fair sampler gives 250 +- 22, the threshold 400 is crossed by
    chance with odds below 1e-9; the draws are fixed by the seed, so the test cannot flake), never a token of
    probability 0; the noise is Exp(1) (mean and variance near 1)."""
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(VOCAB, generator=generator) * 1.5, dim=-1)
    probs[[5, 77, 200]] = 0.0
    draws = SeededDraws(seed=1234)
    n = 20_000
    rows = probs.unsqueeze(0).expand(n, -1)
    counts = torch.bincount(
        torch.cat([seeded_race(rows[i : i + 2000], [draws] * 2000) for i in range(0, n, 2000)]), minlength=VOCAB
    )
    assert draws.draws == n
    assert counts[[5, 77, 200]].sum() == 0
    expected = n * probs / probs.sum()
    cells = expected >= 5
    statistic = float((((counts - expected) ** 2)[cells] / expected[cells]).sum())
    assert int(cells.sum()) > 200 and statistic < 400, statistic
    noise = race_noise(torch.tensor([[9], [0]]), torch.tensor([4]), 100_000)
    assert abs(float(noise.mean()) - 1) < 0.02 and abs(float(noise.var()) - 1) < 0.05 and bool((noise > 0).all())


def test_the_noise_depends_on_the_seed_and_draw_number_only():
    """A row's noise is the same whichever rows are beside it; another seed, another draw number, or the seed's high
    half changed gives other noise; a seed and the same seed plus 2**64 give the same."""
    halves = torch.tensor([[1, 2, 3], [0, 0, 7]])
    numbers = torch.tensor([0, 5, 5])
    together = race_noise(halves, numbers, VOCAB)
    alone = race_noise(halves[:, 1:2], numbers[1:2], VOCAB)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(race_noise(halves[:, :1], torch.tensor([1]), VOCAB)[0], together[0])
    assert not torch.equal(race_noise(torch.tensor([[3], [8]]), torch.tensor([5]), VOCAB)[0], together[2])
    assert SeededDraws(5).halves == SeededDraws(5 + 2**64).halves


AMULET = MethodSettings(method=Method.AMULET, plausibility=0.0)


def test_the_tail_draws_the_host_samplers_tokens_for_seeded_rows():
    """Seeded rows with every filter, beside an unseeded and a greedy row: the tail's tokens are the host sampler's,
    over 30 draws (each side's draws from fresh SeededDraws of the same seeds)."""
    params = [
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=1.2, min_p=0.02, seed=-3),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=2**63),
        SamplingParams(temperature=0.9, logit_bias=((4, 3.0),), seed=7),  # the same seed as the first: its own draws
        SamplingParams(temperature=1.0),  # unseeded: the default generator (not compared)
        SamplingParams(temperature=0),
    ]
    n = len(params)
    specs = [RowSpec(2 * i, 2 * i + 1, AMULET, AMULET.effective_strength) for i in range(n)]
    logits = torch.randn(2 * n, VOCAB, generator=torch.Generator().manual_seed(8)) * 2
    logprobs = method_logprobs(logits, specs)
    host_draws = [make_generator(p) for p in params]
    tail_draws = [make_generator(p) for p in params]
    tail = DecodeTail(8, 2 * n, VOCAB, logits.device)
    for _ in range(30):
        host = sample_on_device(logprobs.clone(), params, host_draws)
        seeds = [None if d is None else (*d.halves, d.draws) for d in tail_draws]
        tail.set_rows(tail_rows(specs, range(2 * n), params, [TailHistory(seed=s) for s in seeds]))
        assert tail.variant.seeded
        tail.compute(logits, n, tail.variant)
        for d in tail_draws:
            if d is not None:
                d.take()  # as the engine does once the tail has drawn
        got = tail.samples().tokens
        seeded = [0, 1, 2, 3, 5]
        assert torch.equal(got[seeded], host.tokens[seeded])
    assert [d.draws for d in host_draws if d] == [d.draws for d in tail_draws if d] == [30] * 4
