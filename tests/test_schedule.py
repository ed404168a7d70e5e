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


def test_every_rank_knows_which_micro_batches_replay():
    """ZeRO-3, FSDP and DDP run collective forwards: in a micro-batch where any rank replays, every rank knows it
    (and runs an empty replay forward if it has no sample)."""
    s = ReplaySchedule(num_samples=37, world_size=2, grad_accum=3, steps_per_epoch=5, per_step=3)
    for step in range(6):
        for m in range(3):
            any_rank = any(s.indices(step, m, r) for r in range(2))
            assert s.micro_has_replay(step, m) == any_rank
        assert sum(len(s.indices(step, m, r)) for m in range(3) for r in range(2)) == 3


@pytest.mark.parametrize("ga,k,expected", [(16, 4, [0, 0, 0, 1] * 4), (8, 3, [0, 0, 1, 0, 0, 1, 0, 1]),
                                           (4, 6, [1, 2, 1, 2]), (2, 2, [1, 1])])
def test_a_step_spreads_its_replay_samples_over_the_micro_batches(ga, k, expected):
    """Per-device batch 1 with accumulation (the paper's runs): any k, spread as evenly as it goes."""
    s = ReplaySchedule(num_samples=50, grad_accum=ga, per_step=k)
    assert [len(s.indices(0, m, 0)) for m in range(ga)] == expected


@pytest.mark.parametrize("n,world,ga,steps", [(10, 1, 1, 4), (37, 2, 3, 5), (100, 2, 2, 250), (8, 1, 2, 8)])
def test_default_mode_uses_every_sample_once_each_epoch_spread_evenly(n, world, ga, steps):
    s = ReplaySchedule(num_samples=n, world_size=world, grad_accum=ga, steps_per_epoch=steps)
    for epoch in range(2):
        seen = []
        per_step = []
        for t in range(steps):
            got = _step_samples(s, epoch * steps + t)
            per_step.append(len(got))
            seen.extend(got)
        assert sorted(seen) == list(range(n))  # each sample exactly once
        assert max(per_step) - min(per_step) <= 1  # even spread over the epoch's steps


def test_replay_per_step_below_one_is_refused():
    with pytest.raises(ReplayScheduleError, match="replay_per_step must be ≥ 1"):
        ReplaySchedule(num_samples=10, per_step=0)


def test_schedule_is_deterministic_and_seeded():
    a = ReplaySchedule(num_samples=50, per_step=5, seed=1)
    b = ReplaySchedule(num_samples=50, per_step=5, seed=1)
    c = ReplaySchedule(num_samples=50, per_step=5, seed=2)
    assert [a.indices(t, 0, 0) for t in range(10)] == [b.indices(t, 0, 0) for t in range(10)]
    assert [a.indices(t, 0, 0) for t in range(10)] != [c.indices(t, 0, 0) for t in range(10)]
