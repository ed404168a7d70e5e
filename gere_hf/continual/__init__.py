"""The continual driver: a recipe of SFT stages, run one after the other with GeRe replay.

Modules: :mod:`~gere_hf.continual.recipe` (the YAML schema, loading, ``--set`` overrides),
:mod:`~gere_hf.continual.runner` (the stage loop), :mod:`~gere_hf.continual.state` (the run folder and
``--resume``), :mod:`~gere_hf.continual.data` (each stage's task, the replay and held-out texts, kept disjoint),
:mod:`~gere_hf.continual.launch` (training arguments, DeepSpeed checks, barriers), :mod:`~gere_hf.continual.adapters`
(how each stage's model is put together), :mod:`~gere_hf.continual.hub` (pushing stages, model cards) and
:mod:`~gere_hf.continual.tracking` (one tracked run a stage). :mod:`~gere_hf.continual.benchmarks` and
:mod:`~gere_hf.continual.replay_data` build the files recipes read (``gere-hf data``: the long-sequence benchmark,
the replay and held-out texts); :mod:`~gere_hf.continual.saved_eval` evaluates a saved model or a run's stage outside a
recipe (``gere-hf eval``).
"""

from .adapters import AdapterConfig, AdapterError, load_stage_model
from .benchmarks import BenchmarkDataError, build_long_sequence
from .hub import HubConfig, HubError
from .recipe import EvaluationConfig, ModelConfig, Recipe, RecipeError, StageConfig, load_recipe, parse_recipe
from .replay_data import ReplayBuildError, build_replay_data
from .runner import RecipeRunner, run_recipe
from .saved_eval import SavedEvalConfig, SavedEvalError, evaluate_saved
from .tracking import TrackingConfig

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "BenchmarkDataError",
    "EvaluationConfig",
    "HubConfig",
    "HubError",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "RecipeRunner",
    "ReplayBuildError",
    "SavedEvalConfig",
    "SavedEvalError",
    "StageConfig",
    "TrackingConfig",
    "build_long_sequence",
    "build_replay_data",
    "evaluate_saved",
    "load_recipe",
    "load_stage_model",
    "parse_recipe",
    "run_recipe",
]
