# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Task accuracy as gere_hf's evaluator judges answers, as a Hugging Face ``evaluate`` module.

The scoring modes are the evaluator's (``gere_hf.evaluation.tasks.SCORING_MODES``) and so is the judgement: the
module runs ``gere_hf.evaluation.tasks.judge_answers``, with the judges ``score_task`` uses, so it needs gere_hf
installed (it ships in it).

* ``loglik`` / ``loglik_norm`` (closed tasks, ``choices`` required): the prediction is the ranked-first choice, right
  when it is the gold completion, character for character.
* ``generate``: with ``choices`` (a closed task), right when the generation equals the label after
  ``normalize_label`` (lowercase, no punctuation, single spaces; articles kept, so an empty answer never matches the
  label "A"); without (a free-form task), after SQuAD's ``normalize_answer``.

    import evaluate
    from gere_hf.evaluation.metrics import metric_path

    acc = evaluate.load(metric_path("task_accuracy"))
    acc.compute(predictions=[" yes"], references=[" yes"], scoring="loglik", choices=[" yes", " no"])
    acc.compute(predictions=["The Nile."], references=["nile"], scoring="generate")   # {"accuracy": 1.0, ...}
"""

import math

import datasets
import evaluate

from gere_hf.evaluation.tasks import judge_answers

_DESCRIPTION = """\
Accuracy of task answers judged as gere_hf's evaluator judges them in a scoring mode (loglik, loglik_norm, generate),
with its binomial standard error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the evaluator's answers (TaskScore.predictions: the chosen choice, or the generated text).
    references: the gold completions (strings).
    scoring: "loglik" (default), "loglik_norm" or "generate", as the task was scored.
    choices: the task's candidate completions (a closed task); None for a free-form task (scoring "generate" only).
Returns:
    accuracy: the fraction right; se: sqrt(accuracy (1 - accuracy) / total); correct; total.
"""


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

    def _compute(self, predictions, references, scoring="loglik", choices=None):
        if not predictions:
            raise ValueError("task_accuracy needs at least one prediction.")
        correct = sum(judge_answers(predictions, references, scoring, choices))
        p = correct / len(predictions)
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(predictions)), "correct": correct,
                "total": len(predictions)}
