import pytest

from gere_hf.schedule import ReplaySchedule, ReplayScheduleError


def _step_samples(s: ReplaySchedule, step: int, micro_batches=None) -> list[int]:
    micro_batches = micro_batches or s.grad_accum
    return [i for m in range(micro_batches) for r in range(s.world_size) for i in s.indices(step, m, r, micro_batches)]


@pytest.mark.parametrize("world,ga,k", [(1, 1, 3), (2, 2, 4), (2, 4, 8), (4, 1, 4)])
def test_bi_puts_exactly_k_per_step_and_uses_each_sample_once_before_reuse(world, ga, k):
    n = 10
    s = ReplaySchedule(num_samples=n, world_size=world, grad_accum=ga, steps_per_epoch=7, per_step=k, seed=3)
    stream = []
    for step in range(12):
        got = _step_samples(s, step)
        assert len(got) == k
        stream.extend(got)
    for p in range(len(stream) // n):
        assert sorted(stream[p * n : (p + 1) * n]) == list(range(n)), f"pass {p} reuses a sample"


def test_bi_on_a_short_last_window_still_gets_k():
    s = ReplaySchedule(num_samples=20, world_size=2, grad_accum=4, per_step=8)
    assert len(_step_samples(s, 5, micro_batches=3)) == 8
    assert len(_step_samples(s, 5, micro_batches=1)) == 8
    assert sorted(_step_samples(s, 5, micro_batches=3)) == sorted(_step_samples(s, 5))


def test_every_micro_batch_of_a_step_on_every_rank_gets_the_same_count():
    # ZeRO-3 gathers parameters in each forward: ranks must run the same number of replay forwards.
    s = ReplaySchedule(num_samples=37, world_size=2, grad_accum=3, steps_per_epoch=5)
    for step in range(15):
        counts = {len(s.indices(step, m, r)) for m in range(3) for r in range(2)}
        assert len(counts) == 1


@pytest.mark.parametrize("n,world,ga,steps", [(10, 1, 1, 4), (37, 2, 3, 5), (100, 2, 2, 250), (8, 1, 2, 8)])
def test_default_mode_covers_every_sample_each_epoch_spread_evenly(n, world, ga, steps):
    s = ReplaySchedule(num_samples=n, world_size=world, grad_accum=ga, steps_per_epoch=steps)
    for epoch in range(2):
        seen = []
        per_step = []
        for t in range(steps):
            got = _step_samples(s, epoch * steps + t)
            per_step.append(len(got))
            seen.extend(got)
        assert set(seen) == set(range(n))
        assert len(seen) == s.rounds_per_epoch * s.slots  # at most slots-1 extra samples an epoch
        nonzero = [c for c in per_step if c]
        assert max(nonzero) - min(nonzero) <= s.slots  # even spread: counts differ by at most one round


def test_indivisible_replay_per_step_names_the_values_that_work():
    with pytest.raises(ReplayScheduleError, match=r"2 process\(es\) × 2 accumulation.*multiple of 4.*4, 8"):
        ReplaySchedule(num_samples=10, world_size=2, grad_accum=2, per_step=6)


def test_schedule_is_deterministic_and_seeded():
    a = ReplaySchedule(num_samples=50, per_step=5, seed=1)
    b = ReplaySchedule(num_samples=50, per_step=5, seed=1)
    c = ReplaySchedule(num_samples=50, per_step=5, seed=2)
    assert [a.indices(t, 0, 0) for t in range(10)] == [b.indices(t, 0, 0) for t in range(10)]
    assert [a.indices(t, 0, 0) for t in range(10)] != [c.indices(t, 0, 0) for t in range(10)]
