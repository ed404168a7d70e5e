# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Continual-learning metrics of an accuracy matrix (AP, BWT, FWT, forgetting) as a Hugging Face ``evaluate`` module.

This file is the one implementation: ``gere_hf.evaluation.continual_metrics`` is :func:`continual_metrics` below,
and ``evaluate.load(<this folder>)`` wraps the same function. It imports nothing from gere_hf, so the folder can be
copied anywhere (or pushed to the Hub) and loaded on its own. Load it offline by path::

    import evaluate
    from gere_hf.evaluation.metrics import metric_path

    cl = evaluate.load(metric_path("continual_metrics"))
    cl.compute(predictions=[[0.2, 0.3], [0.9, 0.4], [0.7, 0.8]])   # rows: base, after stage 1, after stage 2
"""

import math
from collections.abc import Sequence

import datasets
import evaluate

_CITATION = """\
@inproceedings{lopez2017gradient,
  title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}
@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={European Conference on Computer Vision},
  year={2018}
}
"""

_DESCRIPTION = """\
Average performance (AP), backward transfer (BWT), forward transfer (FWT, Lopez-Paz & Ranzato 2017) and forgetting
(Chaudhry et al. 2018) of a continual-learning accuracy matrix R with T + 1 rows of T accuracies: row 0 is the model
before any stage (or None), row t the model after stage t; column j is task j, trained in stage j + 1. FWT's baseline
is row 0, the base model, not Lopez-Paz & Ranzato's randomly initialised model.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the accuracy matrix, one row per example: T + 1 rows (row 0 may be None: no base evaluation), each a
        list of T accuracies (floats). `add(prediction=row)` adds rows one at a time, in order.
Returns:
    num_stages: T.
    ap: mean_j R[T][j], the final average accuracy.
    bwt: mean_{j<T-1} (R[T][j] - R[j+1][j]), None when T = 1. Below 0: forgetting.
    fwt: mean_{j>=1} (R[j][j] - R[0][j]), None when T = 1 or without row 0.
    forgetting: [max_{t=j+1..T-1} R[t][j] - R[T][j] for j < T-1]; mean_forgetting: their mean (None when T = 1).
    learned: [R[j+1][j]]; final: R[T]; ap_per_stage: [mean_{j<t} R[t][j] for t = 1..T].
Examples:
    >>> cl = evaluate.load("path/to/continual_metrics")
    >>> cl.compute(predictions=[[0.25], [0.75]])["ap"]
    0.75
"""


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_metrics(R: Sequence[Sequence[float] | None]) -> dict:
    """AP, BWT, FWT and forgetting of an accuracy matrix.

    ``R`` has ``T + 1`` rows of ``T`` accuracies: row 0 is the base model before any stage (it may be ``None`` when the
    base model was not evaluated), row ``t`` is after stage ``t`` (1..T); column ``j`` (0-based) is task ``j``,
    trained in stage ``j + 1``. So ``R[j + 1][j]`` is task ``j`` just after it was learned and ``R[j][j]`` just before.

    * ``ap``  = mean_j R[T][j]                                  (all T tasks, final model)
    * ``bwt`` = mean_{j=0..T-2} (R[T][j] - R[j+1][j])          (T-1 tasks; None when T = 1)
    * ``fwt`` = mean_{j=1..T-1} (R[j][j] - R[0][j])            (T-1 tasks; None when T = 1 or without row 0)
    * ``forgetting[j]`` = max_{t=j+1..T-1} R[t][j] - R[T][j]   (j = 0..T-2); ``mean_forgetting`` their mean

    In the 1-based notation of the literature (task i trained in stage i, R_{t,i}): BWT = 1/(T-1) Σ_{i<T} R_{T,i} -
    R_{i,i}; FWT = 1/(T-1) Σ_{i>1} R_{i-1,i} - R_{0,i}; f_i = max_{t∈[i,T-1]} R_{t,i} - R_{T,i}.

    Also returned: ``learned`` (R[j+1][j]), ``final`` (R[T]), ``ap_per_stage`` (mean of R[t][:t], the seen tasks,
    for t = 1..T) and ``num_stages`` (T).
    """
    rows = [None if row is None else list(row) for row in R]
    if len(rows) < 2:
        raise ValueError(
            f"The accuracy matrix needs T + 1 >= 2 rows (row 0: base model, row t: after stage t); got {len(rows)}."
        )
    T = len(rows) - 1
    for t, row in enumerate(rows):
        if row is None:
            if t == 0:
                continue
            raise ValueError(f"Row {t} (after stage {t}) of the accuracy matrix is missing; evaluate after every stage.")
        if len(row) != T:
            raise ValueError(
                f"Row {t} of the accuracy matrix has {len(row)} entries but there are T = {T} stages: each row needs "
                f"one accuracy per task (T columns)."
            )
        bad = [x for x in row if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x)]
        if bad:
            raise ValueError(f"Row {t} of the accuracy matrix holds non-numbers {bad}; every entry must be a number.")
    base = rows[0]
    final = rows[T]
    learned = [rows[j + 1][j] for j in range(T)]
    forgetting = [max(rows[t][j] for t in range(j + 1, T)) - final[j] for j in range(T - 1)]
    return {
        "num_stages": T,
        "ap": _mean(final),
        "bwt": _mean([final[j] - rows[j + 1][j] for j in range(T - 1)]),
        "fwt": None if base is None else _mean([rows[j][j] - base[j] for j in range(1, T)]),
        "mean_forgetting": _mean(forgetting),
        "forgetting": forgetting,
        "learned": learned,
        "final": final,
        "ap_per_stage": [_mean(rows[t][:t]) for t in range(1, T + 1)],
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualMetrics(evaluate.Metric):
    """AP, BWT, FWT and forgetting of an accuracy matrix given row by row (:func:`continual_metrics`)."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64: float32 would round 0.8 to 0.79999999 on its way through Arrow.
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/1706.08840", "https://arxiv.org/abs/1801.10112"],
        )

    def _compute(self, predictions):
        return continual_metrics(predictions)
