"""The evaluation wing: tasks, scoring, continual-learning metrics, general retention, the evaluator, reports.

Modules: :mod:`~gere_hf.evaluation.tasks` (prompt-completion tasks, built-in offline ones),
:mod:`~gere_hf.evaluation.scoring` (choice ranking and generation), :mod:`~gere_hf.evaluation.metrics` (AP, BWT,
FWT, forgetting; the shipped ``evaluate`` modules), :mod:`~gere_hf.evaluation.retention` (held-out NLL, lm-eval),
:mod:`~gere_hf.evaluation.mmlu` (MMLU, offline or from the Hub), :mod:`~gere_hf.evaluation.evaluator`
(the accuracy matrix of a run), :mod:`~gere_hf.evaluation.report` (``results.json``, ``report.md``, figures,
comparisons); :mod:`~gere_hf.evaluation.utils` holds the model plumbing they share.
"""

from .evaluator import RESULTS_SCHEMA_VERSION, ContinualEvaluator
from .metrics import continual_metrics, load_metric, metric_path
from .mmlu import MMLU_CATEGORIES, MMLU_SUBJECTS, MMLUConfig, MMLUDataError, MMLUEvaluator, evaluate_mmlu, load_mmlu
from .report import compare_runs, load_results, write_report
from .retention import DEFAULT_GENERAL_MAX_LENGTH, general_perplexity, lm_eval_tasks, texts_fingerprint
from .scoring import (
    TASK_SCORERS,
    ChoiceLogprobs,
    TaskScore,
    TaskScorer,
    choice_logprobs,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    generate_answers,
    judge_answers,
    normalize_answer,
    normalize_label,
    predict_task,
    prompt_context_ids,
    score_choices,
    score_task,
    score_tasks,
    tokenize_prompt_completion,
)
from .tasks import BUILTIN_TASKS, Task, TaskDataError, load_builtin_task, task_from_dataset

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_GENERAL_MAX_LENGTH",
    "MMLU_CATEGORIES",
    "MMLU_SUBJECTS",
    "MMLUConfig",
    "MMLUDataError",
    "MMLUEvaluator",
    "RESULTS_SCHEMA_VERSION",
    "TASK_SCORERS",
    "ChoiceLogprobs",
    "ContinualEvaluator",
    "Task",
    "TaskDataError",
    "TaskScore",
    "TaskScorer",
    "choice_logprobs",
    "compare_runs",
    "continual_metrics",
    "evaluate_mmlu",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "general_perplexity",
    "generate_answers",
    "judge_answers",
    "lm_eval_tasks",
    "load_builtin_task",
    "load_metric",
    "load_mmlu",
    "load_results",
    "metric_path",
    "normalize_answer",
    "normalize_label",
    "predict_task",
    "prompt_context_ids",
    "score_choices",
    "score_task",
    "score_tasks",
    "task_from_dataset",
    "texts_fingerprint",
    "tokenize_prompt_completion",
    "write_report",
]
