"""Which replay samples go into which micro-batch: a pure function of (optimizer step, micro-batch, rank).

Replay samples are consumed as a stream of seeded permutations of the replay set (pass p is permutation p), so every
sample is used once before any is reused (in the default mode, exactly once in every epoch). Each optimizer step
takes a contiguous range of that stream and spreads it as evenly as it goes over its *slots*, one slot per
(accumulation micro-batch, process): with per-device batch 1 and 16 accumulation steps, 4 replay samples per step
land in micro-batches 3, 7, 11 and 15, as the paper's batch interpolation spreads them over its global batch.
Keying on the trainer state rather than on the dataloader keeps the mix exact under dataloader workers, resumption
from a checkpoint and any number of processes. Where a micro-batch gives replay samples to some processes and none to
others, :meth:`ReplaySchedule.micro_has_replay` tells every process so, and those without run an empty replay
forward: under ZeRO-3, FSDP and DDP every forward is a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class ReplayScheduleError(ValueError):
    """A replay mix that cannot be laid out over the processes and accumulation steps."""


def _even_part(total: int, parts: int, j: int) -> tuple[int, int]:
    """(offset, count) of part ``j`` when ``total`` items are split into ``parts`` contiguous parts as evenly as
    possible; the larger parts are spread out (floor((j + 1)·total / parts) − floor(j·total / parts))."""
    start = (j * total) // parts
    return start, ((j + 1) * total) // parts - start


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
        if self.per_step is not None and self.per_step < 1:
            raise ReplayScheduleError(f"replay_per_step must be ≥ 1 (or None), got {self.per_step}.")

    @property
    def slots(self) -> int:
        return self.world_size * self.grad_accum

    def step_range(self, step: int) -> tuple[int, int]:
        """(first stream position, number of samples) of optimizer step ``step`` (0-based, global).

        With ``per_step`` every step takes that many; by default an epoch's steps share the replay set, each sample
        once, the steps' counts differing by at most one.
        """
        if self.per_step is not None:
            return step * self.per_step, self.per_step
        epoch, t = divmod(step, self.steps_per_epoch)
        offset, count = _even_part(self.num_samples, self.steps_per_epoch, t)
        return epoch * self.num_samples + offset, count

    def _slot_positions(self, step: int, slot: int) -> range:
        start, count = self.step_range(step)
        offset, n = _even_part(count, self.slots, slot)
        return range(start + offset, start + offset + n)

    def _slots_of(self, micro: int, rank: int, micro_batches: int | None) -> list[int]:
        # A step with fewer micro-batches than grad_accum (an epoch's last) gives micro-batch m the missing ones' slots
        # too, so that it still gets its full count.
        micro_batches = micro_batches or self.grad_accum
        return [a * self.world_size + rank for a in range(micro, self.grad_accum, micro_batches)]

    def indices(self, step: int, micro: int, rank: int, micro_batches: int | None = None) -> list[int]:
        """Replay sample indices for micro-batch ``micro`` of ``step`` on ``rank``.

        ``micro_batches`` is how many micro-batches this step really has (fewer than ``grad_accum`` on an epoch's last
        step); micro-batch m then also carries the slots of the missing ones, so the step still gets its full count.
        """
        return [self.sample_at(p) for slot in self._slots_of(micro, rank, micro_batches)
                for p in self._slot_positions(step, slot)]

    def micro_has_replay(self, step: int, micro: int, micro_batches: int | None = None) -> bool:
        """Whether any process has replay samples in this micro-batch (then every process runs a replay forward)."""
        return any(len(self._slot_positions(step, slot)) for rank in range(self.world_size)
                   for slot in self._slots_of(micro, rank, micro_batches))

    def sample_at(self, position: int) -> int:
        """The replay sample at a stream position: pass after pass of fresh permutations of the replay set (in the
        default mode, pass p is epoch p)."""
        p, i = divmod(position, self.num_samples)
        return int(_permutation(self.num_samples, self.seed, p)[i])


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, p: int) -> np.ndarray:
    return np.random.default_rng([seed, p]).permutation(n)
