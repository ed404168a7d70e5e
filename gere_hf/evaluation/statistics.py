"""The statistics of a comparison of methods over seeds: pure functions, no model, no files.

Which test, and why (docs/sweep.md says the same for users):

* **Between seeds** (the primary interval): each run's metric is one number per seed; an arm's mean gets a 95 %
  Student-t interval over its seeds, and a difference between two arms the paired t interval over the seeds they
  share (same seed: same data subsets, same LoRA initialisation, same replay texts, so the pairing removes what the
  seed does to both). With few seeds the t quantile is large (4.30 at 3 seeds): honest about the few seeds, which
  are the only replicates of the training randomness.
* **Per example, pooled over seeds** (for accuracies): every eval example is scored in both arms of a seed. Two
  views of those paired right/wrong answers: a two-level bootstrap (seeds resampled, then each seed's examples,
  the same examples for both arms) of the difference in mean accuracy, which counts both the seeds and the examples
  as random; and the exact McNemar test on the discordant pairs pooled over seeds, which treats the examples as the
  only randomness (it says whether the two arms answer differently on these examples, not whether a new seed would
  agree). With 3 seeds the seed level of the bootstrap has only 10 distinct draws; it is reported beside the t
  interval, not instead of it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "mcnemar_exact", "mean_interval", "paired_bootstrap", "paired_interval", "student_t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"need 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval ``[low, high]`` over ``n`` values (``None`` bounds when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "half_width": self.half_width, "n": self.n,
                "excludes_zero": self.excludes_zero}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` and its Student-t interval (sample standard deviation, n − 1 degrees of freedom)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(a: Mapping, b: Mapping, confidence: float = 0.95) -> Interval:
    """``a − b`` over the keys both have (seeds): the paired t interval of the mean difference."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two arms share no seed")
    return mean_interval([a[k] - b[k] for k in keys], confidence)


def _accuracy_difference(pairs) -> float:
    """Mean over (seed, task) of accuracy(a) − accuracy(b); ``pairs`` lists each (seed, task)'s paired answers."""
    diffs = [sum(x - y for x, y in answers) / len(answers) for answers in pairs]
    return sum(diffs) / len(diffs)


def paired_bootstrap(a: Mapping[str, Mapping[str, Sequence[int]]], b: Mapping[str, Mapping[str, Sequence[int]]],
                     resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Two-level bootstrap of the difference in mean accuracy (over tasks, then seeds) between two arms.

    ``a[seed][task]`` and ``b[seed][task]`` are the right (1) / wrong (0) answers of the same eval examples, in the same
    order. Each resample draws seeds with replacement, then, within each drawn seed and task, examples with
    replacement (the same indices for both arms). Returns the observed difference and the percentile interval.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed")
    table = {s: {t: list(zip(a[s][t], b[s][t])) for t in sorted(set(a[s]) & set(b[s]))} for s in seeds}
    for s, tasks in table.items():
        for t, answers in tasks.items():
            if len(a[s][t]) != len(b[s][t]) or not answers:
                raise ValueError(f"seed {s}, task {t}: the two arms scored different examples")
    observed = _accuracy_difference([answers for s in seeds for answers in table[s].values()])
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        drawn = [rng.choice(seeds) for _ in seeds]
        pairs = []
        for s in drawn:
            for answers in table[s].values():
                pairs.append([answers[rng.randrange(len(answers))] for _ in answers])
        stats.append(_accuracy_difference(pairs))
    stats.sort()
    alpha = (1 - confidence) / 2
    low = stats[int(math.floor(alpha * (resamples - 1)))]
    high = stats[int(math.ceil((1 - alpha) * (resamples - 1)))]
    return Interval(observed, low, high, len(seeds))


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> dict:
    """Exact two-sided McNemar test on paired right/wrong answers: ``{"a_only", "b_only", "p_value"}`` (``a_only``:
    examples ``a`` gets right and ``b`` wrong). Under the null the discordant pairs split 50/50."""
    if len(a) != len(b):
        raise ValueError("the two answer lists differ in length")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2.0 * tail)}
