"""Seeded draws that depend only on the request's seed and on how many tokens it has drawn: the same on the host
and inside a captured decode graph, whichever requests share the step.

A seeded request draws its i-th token by the exponential race, ``argmax(p / E)`` with ``E_v ~ Exp(1)`` independent
per vocabulary id (the multinomial's distribution), its ``E`` computed from (seed, i, v) by a counter-based hash
(:func:`race_noise`) instead of read from a stateful generator. So the host path (``sampler.sample_on_device``) and
the decode graph's tail (:mod:`amulet_core.engine.decode_tail`) give a seeded request the same tokens, an engine can
choose each step's tokens where it likes, and a seeded request answers the same alone or in a batch.

The hash is ``lowbias32`` (Chris Wellons' integer hash: two multiply-xorshift rounds, good avalanche): a draw's
key from the seed and the draw number, then each token id, spread by a multiplication, mixed with the key. It works
on 32-bit values held in int64 tensors, its 32-bit products formed from 16-bit halves so that nothing overflows: the
same integers on any device. A draw's uniform keeps 23 bits, ``(h >> 9 + 0.5) / 2**23``: exact in float32, never 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amulet_core.device_tensors import to_device

_MASK = 0xFFFFFFFF


@dataclass
class SeededDraws:
    """A seeded request's place in its draws: ``seed`` (any whole number; taken modulo 2**64) and how many tokens it
    has drawn (``draws``). Stands where an unseeded request has no generator: the sampler takes the draw's number
    (:meth:`take`) and advances it."""

    seed: int
    draws: int = 0

    def take(self) -> int:
        """This draw's number; the next one's is one more."""
        draw = self.draws
        self.draws += 1
        return draw

    @property
    def halves(self) -> tuple[int, int]:
        """The seed's low and high 32 bits (the seed modulo 2**64)."""
        seed = self.seed % 2**64
        return seed & _MASK, seed >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c`` modulo 2**32 for ``x`` in [0, 2**32) (int64) and a 32-bit constant, without an int64 overflow."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of 32-bit values in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def race_noise(seed_halves: torch.Tensor, draws: torch.Tensor, vocab: int) -> torch.Tensor:
    """``E ~ Exp(1)``, ``[R, vocab]`` float32, of R draws: ``seed_halves`` ``[2, R]`` (each seed's low and high 32
    bits, int64) and ``draws`` ``[R]`` (int64, each draw's number); a function of those and the vocabulary id only.
    Fixed shapes and no host synchronisation (a decode graph can hold it)."""
    low, high = seed_halves[0], seed_halves[1]
    key = _mix(_mix(low ^ _mix(high ^ 0x9E3779B9)) ^ (draws & _MASK))
    ids = _mul32(torch.arange(vocab, dtype=torch.long, device=draws.device), 0x9E3779B1)  # distinct, spread out
    bits = _mix(key.unsqueeze(1) ^ ids.unsqueeze(0))
    uniform = ((bits >> 9).float() + 0.5) * (1.0 / 2**23)
    return -torch.log(uniform)


def seeded_race(probs: torch.Tensor, draws: list[SeededDraws]) -> torch.Tensor:
    """One token per row of ``probs`` ``[R, V]`` (unnormalised probabilities, as a multinomial takes them), row i
    drawn by ``draws[i]`` (its draw number advanced)."""
    device = probs.device
    halves = to_device([[d.halves[0] for d in draws], [d.halves[1] for d in draws]], device, torch.long)
    numbers = to_device([d.take() for d in draws], device, torch.long)
    return (probs / race_noise(halves, numbers, probs.shape[-1])).argmax(dim=-1)
