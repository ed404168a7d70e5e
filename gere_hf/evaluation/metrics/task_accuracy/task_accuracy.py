# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Task accuracy as gere_hf judges answers, as a Hugging Face ``evaluate`` module.

Closed tasks (``scoring="choice"``): an answer is right when the chosen option is the gold completion, character for
character (gere_hf ranks the options by log-likelihood; the prediction is one of them). Free-form tasks
(``scoring="exact_match"``): right when both are equal after gere_hf's SQuAD-style normalisation
(``gere_hf.evaluation.scoring.normalize_answer``: lowercase, no punctuation, no articles, single spaces). The
normalisation is gere_hf's own function, imported here, so the module needs gere_hf installed (it ships in it).

    import evaluate
    from gere_hf.evaluation.metrics import metric_path

    acc = evaluate.load(metric_path("task_accuracy"))
    acc.compute(predictions=["The Nile."], references=["nile"], scoring="exact_match")   # {"accuracy": 1.0, ...}
"""

import math

import datasets
import evaluate

from gere_hf.evaluation.scoring import exact_match

_DESCRIPTION = """\
Accuracy of task answers: chosen option equal to the gold one (scoring="choice") or normalised exact match
(scoring="exact_match"), with its binomial standard error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the model's answers (strings).
    references: the gold completions (strings).
    scoring: "choice" (equal strings; default) or "exact_match" (equal after normalize_answer).
Returns:
    accuracy: the fraction right; se: sqrt(accuracy (1 - accuracy) / total); correct; total.
"""

_JUDGES = {"choice": lambda p, r: p == r, "exact_match": exact_match}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TaskAccuracy(evaluate.Metric):
    """Accuracy of task answers as gere_hf's evaluator judges them."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, scoring="choice"):
        if scoring not in _JUDGES:
            raise ValueError(f"scoring must be one of {', '.join(_JUDGES)}, got {scoring!r}.")
        if not predictions:
            raise ValueError("task_accuracy needs at least one prediction.")
        judge = _JUDGES[scoring]
        correct = sum(bool(judge(p, r)) for p, r in zip(predictions, references))
        p = correct / len(predictions)
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(predictions)), "correct": correct,
                "total": len(predictions)}
