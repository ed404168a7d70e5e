"""gere_hf: General Sample Replay (GeRe) for continual fine-tuning, as a drop-in for transformers and TRL trainers.

Three layers: the plugin core at the top level (``config``, ``replay``, ``reference``, ``schedule``, ``collator``,
``losses``, ``replay_terms``, ``trainer``, ``models``), and built on it the continual driver (``gere_hf.continual``:
recipes, the stage loop, run state, adapters, the Hub) and the evaluation (``gere_hf.evaluation``: tasks, scoring,
metrics, general retention, the evaluator, reports).
"""

__version__ = "0.1.0"

from .lazy import lazy_names

# Public names load on first use: `gere-hf inspect` should not pay for importing trl and the Trainer stack.
_LAZY = {
    # The plugin core.
    "GeReCollator": ".collator",
    "GeReConfig": ".config",
    "GeReConfigError": ".config",
    "GeReSFTTrainer": ".trainer",
    "GeReTrainer": ".trainer",
    "GeReTrainingError": ".trainer",
    "ExcludedTexts": ".replay",
    "ReferenceStore": ".reference",
    "ReferenceStoreError": ".reference",
    "ReferenceStoreMismatch": ".reference",
    "ReferenceStates": ".reference",  # the store's name in gere_hf 0.1
    "ReferenceStatesError": ".reference",
    "ReferenceStatesMismatch": ".reference",
    "ReplayDataError": ".replay",
    "ReplaySchedule": ".schedule",
    "ReplayScheduleError": ".schedule",
    "ReplaySet": ".replay",
    "ReplayTerm": ".replay_terms",
    "UnsupportedModelError": ".models",
    "causal_lm_loss": ".losses",
    "dynamic_weight": ".losses",
    "feature_imitation_loss": ".losses",
    "find_final_norm": ".models",
    "load_model_and_tokenizer": ".models",
    "load_replay_texts": ".replay",
    "logit_imitation_loss": ".losses",
    "register_replay_term": ".replay_terms",
    "replay_heldout_texts": ".replay",
    "select_heldout_texts": ".replay",
    "threshold_labels": ".losses",
    "threshold_margin_loss": ".losses",
    "token_nll": ".losses",
    # The continual driver.
    "Recipe": ".continual",
    "RecipeError": ".continual",
    "RecipeRunner": ".continual",
    "build_long_sequence": ".continual",
    "build_replay_data": ".continual",
    "load_recipe": ".continual",
    "load_stage_model": ".continual",
    "run_recipe": ".continual",
    "evaluate_saved": ".continual",
    # The evaluation.
    "ContinualEvaluator": ".evaluation",
    "Task": ".evaluation",
    "compare_runs": ".evaluation",
    "continual_metrics": ".evaluation",
    "load_builtin_task": ".evaluation",
    "MMLUConfig": ".evaluation",
    "MMLUEvaluator": ".evaluation",
    "evaluate_mmlu": ".evaluation",
    "task_from_dataset": ".evaluation",
    "write_report": ".evaluation",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = sorted(_LAZY)  # noqa: PLE0605 (lazily provided by __getattr__)
