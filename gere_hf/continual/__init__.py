"""The continual driver: a recipe of SFT stages, run one after the other with GeRe replay.

Modules: :mod:`~gere_hf.continual.recipe` (the YAML schema, loading, ``--set`` overrides; its ``RecipeError`` lives in
:mod:`~gere_hf.continual.errors`), :mod:`~gere_hf.continual.arguments` (each stage's training arguments and the checks
of the ``training`` and ``peft`` sections), :mod:`~gere_hf.continual.runner` (the stage loop),
:mod:`~gere_hf.continual.state` (the run folder, ``--resume``, a finished stage's model),
:mod:`~gere_hf.continual.data` (each stage's task, the replay and held-out texts, kept disjoint),
:mod:`~gere_hf.continual.preflight` (the checks once the model is known), :mod:`~gere_hf.continual.launch` (the stages'
SFTConfigs, DeepSpeed checks), :mod:`~gere_hf.continual.adapters` (how each stage's model is put together),
:mod:`~gere_hf.continual.hub` (pushing stages, model cards) and :mod:`~gere_hf.continual.tracking` (one tracked run a
stage). :mod:`~gere_hf.continual.benchmarks` and :mod:`~gere_hf.continual.replay_data` build the files recipes read
(``gere-hf data``: the long-sequence benchmark, the replay and held-out texts); :mod:`~gere_hf.continual.saved_eval`
evaluates a saved model or a run's stage outside a recipe (``gere-hf eval``); :mod:`~gere_hf.continual.sweep` runs arms
× seeds of a recipe (``gere-hf sweep``). The names below load on first use: importing one module does not import the
others.
"""

from ..lazy import lazy_names

_LAZY = {
    "AdapterConfig": ".adapters",
    "AdapterError": ".adapters",
    "BenchmarkDataError": ".benchmarks",
    "build_long_sequence": ".benchmarks",
    "HubConfig": ".hub",
    "HubError": ".hub",
    "EvaluationConfig": ".recipe",
    "ModelConfig": ".recipe",
    "Recipe": ".recipe",
    "RecipeError": ".recipe",
    "StageConfig": ".recipe",
    "load_recipe": ".recipe",
    "parse_recipe": ".recipe",
    "ReplayBuildError": ".replay_data",
    "build_replay_data": ".replay_data",
    "RecipeRunner": ".runner",
    "run_recipe": ".runner",
    "SavedEvalConfig": ".saved_eval",
    "SavedEvalError": ".saved_eval",
    "evaluate_saved": ".saved_eval",
    "load_stage_model": ".state",
    "TrackingConfig": ".tracking",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = sorted(_LAZY)  # noqa: PLE0605 (lazily provided by __getattr__)
