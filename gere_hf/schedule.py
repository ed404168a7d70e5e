"""Which replay samples go into which micro-batch: a pure function of (optimizer step, micro-batch, rank).

Replay samples are consumed as a stream of seeded permutations of the replay set (pass p is permutation p), so every
sample is used once before any is reused (in the default mode, once in every epoch). Each optimizer step takes a contiguous range of that stream and splits it
evenly over its *slots*, one slot per (accumulation micro-batch, process). Keying on the trainer state rather than on
the dataloader keeps the mix exact under dataloader workers, resumption from a checkpoint and any number of processes,
and every process runs the same number of replay forwards (ZeRO-3 gathers parameters collectively in each forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class ReplayScheduleError(ValueError):
    """A replay mix that cannot be laid out over the processes and accumulation steps."""


@dataclass(frozen=True)
class ReplaySchedule:
    num_samples: int
    world_size: int = 1
    grad_accum: int = 1
    steps_per_epoch: int = 1
    per_step: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ReplayScheduleError("The replay set is empty.")
        if self.per_step is not None and self.per_step % self.slots:
            works = sorted({self.slots * m for m in range(1, 5)})
            raise ReplayScheduleError(
                f"replay_per_step={self.per_step} cannot be split evenly over {self.world_size} process(es) × "
                f"{self.grad_accum} accumulation step(s) = {self.slots} micro-batches per optimizer step. "
                f"Use a multiple of {self.slots}, e.g. {', '.join(map(str, works))}."
            )

    @property
    def slots(self) -> int:
        return self.world_size * self.grad_accum

    @property
    def rounds_per_epoch(self) -> int:
        """Default mode: one round gives one sample to every slot; enough rounds to cover the replay set once."""
        return math.ceil(self.num_samples / self.slots)

    def step_range(self, step: int) -> tuple[int, int]:
        """(first stream position, number of samples) of optimizer step ``step`` (0-based, global)."""
        if self.per_step is not None:
            return step * self.per_step, self.per_step
        epoch, t = divmod(step, self.steps_per_epoch)
        r, s = self.rounds_per_epoch, self.steps_per_epoch
        before = epoch * r + (t * r) // s
        here = ((t + 1) * r) // s - (t * r) // s
        return before * self.slots, here * self.slots

    def per_micro_batch(self, step: int) -> int:
        return self.step_range(step)[1] // self.slots

    def indices(self, step: int, micro: int, rank: int, micro_batches: int | None = None) -> list[int]:
        """Replay sample indices for micro-batch ``micro`` of ``step`` on ``rank``.

        ``micro_batches`` is how many micro-batches this step really has (fewer than ``grad_accum`` on an epoch's last
        step); micro-batch m then also carries the slots of the missing ones, so the step still gets its full count.
        """
        start, count = self.step_range(step)
        if count == 0:
            return []
        per_slot = count // self.slots
        micro_batches = micro_batches or self.grad_accum
        out = []
        for a in range(micro, self.grad_accum, micro_batches):
            slot = a * self.world_size + rank
            out.extend(self.sample_at(start + slot * per_slot + j) for j in range(per_slot))
        return out

    def sample_at(self, position: int) -> int:
        """The replay sample at a stream position.

        With ``per_step`` the stream is pass after pass of fresh permutations. In the default mode each epoch has its
        own permutation, cycled to fill the epoch's rounds, so every sample is used in every epoch (the fewer than
        ``slots`` samples that round up the last round are used twice).
        """
        if self.per_step is not None:
            p, i = divmod(position, self.num_samples)
        else:
            p, q = divmod(position, self.rounds_per_epoch * self.slots)
            i = q % self.num_samples
        return int(_permutation(self.num_samples, self.seed, p)[i])


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, p: int) -> np.ndarray:
    return np.random.default_rng([seed, p]).permutation(n)
