"""The evaluation: tasks, scoring, continual-learning metrics, general retention, the evaluator, reports."""

from .scoring import (
    ContinualEvaluator,
    continual_metrics,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    general_perplexity,
    generate_answers,
    lm_eval_tasks,
    normalize_answer,
    predict_task,
    score_choices,
    texts_fingerprint,
    tokenize_prompt_completion,
)

__all__ = [
    "ContinualEvaluator",
    "continual_metrics",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "general_perplexity",
    "generate_answers",
    "lm_eval_tasks",
    "normalize_answer",
    "predict_task",
    "score_choices",
    "texts_fingerprint",
    "tokenize_prompt_completion",
]
