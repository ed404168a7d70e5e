"""The evaluation wing: tasks, scoring, continual-learning metrics, general retention, the evaluator, reports.

Modules: :mod:`~gere_hf.evaluation.tasks` (prompt-completion tasks, built-in offline ones),
:mod:`~gere_hf.evaluation.scoring` (choice ranking and generation), :mod:`~gere_hf.evaluation.metrics` (AP, BWT,
FWT, forgetting; the shipped ``evaluate`` modules), :mod:`~gere_hf.evaluation.retention` (held-out NLL, lm-eval),
:mod:`~gere_hf.evaluation.mmlu` (MMLU, offline or from the Hub), :mod:`~gere_hf.evaluation.evaluator`
(the accuracy matrix of a run), :mod:`~gere_hf.evaluation.report` (``results.json``, ``report.md``, figures,
comparisons); :mod:`~gere_hf.evaluation.utils` holds the model plumbing they share. The names below load on first
use: importing one module does not import the others.
"""

from ..lazy import lazy_names

_LAZY = {
    "RESULTS_SCHEMA_VERSION": ".evaluator",
    "ContinualEvaluator": ".evaluator",
    "continual_metrics": ".metrics",
    "load_metric": ".metrics",
    "metric_path": ".metrics",
    "MMLU_CATEGORIES": ".mmlu",
    "MMLU_SUBJECTS": ".mmlu",
    "MMLUConfig": ".mmlu",
    "MMLUDataError": ".mmlu",
    "MMLUEvaluator": ".mmlu",
    "evaluate_mmlu": ".mmlu",
    "load_mmlu": ".mmlu",
    "compare_runs": ".report",
    "load_results": ".report",
    "write_report": ".report",
    "DEFAULT_GENERAL_MAX_LENGTH": ".retention",
    "general_perplexity": ".retention",
    "lm_eval_tasks": ".retention",
    "texts_fingerprint": ".retention",
    "TASK_SCORERS": ".scoring",
    "ChoiceLogprobs": ".scoring",
    "TaskScore": ".scoring",
    "TaskScorer": ".scoring",
    "choice_logprobs": ".scoring",
    "evaluate_task": ".scoring",
    "evaluate_tasks": ".scoring",
    "exact_match": ".tasks",
    "generate_answers": ".scoring",
    "judge_answers": ".tasks",
    "normalize_answer": ".tasks",
    "normalize_label": ".tasks",
    "predict_task": ".scoring",
    "prompt_context_ids": ".scoring",
    "score_choices": ".scoring",
    "score_task": ".scoring",
    "score_tasks": ".scoring",
    "tokenize_prompt_completion": ".scoring",
    "BUILTIN_TASKS": ".tasks",
    "SCORING_MODES": ".tasks",
    "ScoringMode": ".tasks",
    "Task": ".tasks",
    "TaskDataError": ".tasks",
    "load_builtin_task": ".tasks",
    "task_from_dataset": ".tasks",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = sorted(_LAZY)  # noqa: PLE0605 (lazily provided by __getattr__)
