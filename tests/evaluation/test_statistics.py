"""gere_hf.evaluation.statistics against scipy and against hand computations."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from gere_hf.evaluation.statistics import (
    mcnemar_exact,
    mean_interval,
    paired_bootstrap,
    paired_interval,
    student_t_quantile,
)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 15, 40])
@pytest.mark.parametrize("q", [0.975, 0.95, 0.9, 0.025])
def test_student_t_quantile_equals_scipy(df, q):
    assert student_t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-9)


def test_mean_interval_is_the_t_interval():
    values = [0.52, 0.61, 0.57]
    got = mean_interval(values)
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert got.mean == pytest.approx(mean) and got.half_width == pytest.approx(half) and got.n == 3
    assert not got.excludes_zero or got.low > 0
    one = mean_interval([0.5])
    assert one.low is None and one.half_width is None and not one.excludes_zero


def test_paired_interval_uses_the_shared_seeds_only():
    a, b = {0: 0.6, 1: 0.7, 2: 0.65, 3: 0.9}, {0: 0.5, 1: 0.55, 2: 0.6}
    got = paired_interval(a, b)
    diffs = [0.1, 0.15, 0.05]
    assert got.n == 3 and got.mean == pytest.approx(0.1)
    ref = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert (got.low, got.high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert not got.excludes_zero  # three seeds: +0.10 [−0.02, +0.22] is not resolved
    assert paired_interval({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.6, 2: 0.55}).excludes_zero  # always +0.10


def test_paired_bootstrap_resamples_seeds_then_examples():
    a = {0: {"t1": [1, 1, 1, 0], "t2": [1, 0, 1, 1]}, 1: {"t1": [1, 1, 0, 0], "t2": [1, 1, 1, 1]}}
    b = {0: {"t1": [0, 1, 0, 0], "t2": [1, 0, 0, 1]}, 1: {"t1": [0, 1, 0, 0], "t2": [1, 1, 0, 1]}}
    got = paired_bootstrap(a, b, resamples=500, seed=1)
    # Observed: mean over (seed, task) of the accuracy differences: (0.5 + 0.25 + 0.25 + 0.25) / 4.
    assert got.mean == pytest.approx(0.3125) and got.low <= got.mean <= got.high
    assert paired_bootstrap(a, b, resamples=500, seed=1) == got  # deterministic for its seed
    same = paired_bootstrap(a, a, resamples=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="different examples"):
        paired_bootstrap(a, {0: {"t1": [1], "t2": [1]}, 1: b[1]})


def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_pairs():
    a = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    b = [0, 0, 1, 0, 0, 1, 1, 0, 0, 1]
    got = mcnemar_exact(a, b)
    assert (got["a_only"], got["b_only"]) == (5, 1)
    assert got["p_value"] == pytest.approx(stats.binomtest(1, 6, 0.5).pvalue)
    assert mcnemar_exact([1, 0], [1, 0]) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
