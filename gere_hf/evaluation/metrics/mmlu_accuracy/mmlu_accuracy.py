# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""MMLU accuracy per subject, per category (Humanities, STEM, Social Sciences, Other) and overall, with binomial
standard errors, as a Hugging Face ``evaluate`` module.

The aggregation and the 57-subject table (hendrycks/test categories.py) are gere_hf's
(``gere_hf.evaluation.mmlu.mmlu_summary``), imported here, so the module needs gere_hf installed (it ships in it).

    import evaluate
    from gere_hf.evaluation.metrics import metric_path

    mmlu = evaluate.load(metric_path("mmlu_accuracy"))
    mmlu.compute(predictions=[0, 2], references=[0, 1], subjects=["anatomy", "virology"])
"""

import datasets
import evaluate

from gere_hf.evaluation.mmlu import mmlu_summary

_DESCRIPTION = """\
MMLU accuracy from predicted and gold option indices (0-3) and each question's subject: micro accuracy over the
questions (as hendrycks/test reports it) and macro accuracy over the subjects, per category and per subject, with
binomial standard errors.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted option indices (0-3).
    references: gold option indices (0-3).
    subjects: each question's subject (e.g. "high_school_physics"; one of the 57).
Returns:
    accuracy, se (micro, binomial), macro_accuracy, macro_se, num_questions, correct, num_subjects,
    categories: {name: {accuracy, se, num_questions, correct}}, subjects: {name: {..., category}}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MmluAccuracy(evaluate.Metric):
    """MMLU accuracy per subject, category and overall, with standard errors."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="@article{hendrycks2021measuring, title={Measuring Massive Multitask Language Understanding}, "
            "author={Hendrycks, Dan and Burns, Collin and Basart, Steven and Zou, Andy and Mazeika, Mantas and "
            "Song, Dawn and Steinhardt, Jacob}, journal={ICLR}, year={2021}}",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64"),
                                        "subjects": datasets.Value("string")}),
            reference_urls=["https://github.com/hendrycks/test"],
        )

    def _compute(self, predictions, references, subjects):
        return mmlu_summary(subjects, [p == r for p, r in zip(predictions, references)])
