"""The continual driver: a recipe of SFT stages, run one after the other with GeRe replay.

Modules: :mod:`~gere_hf.continual.recipe` (the YAML schema, loading, ``--set`` overrides),
:mod:`~gere_hf.continual.runner` (the stage loop), :mod:`~gere_hf.continual.state` (the run folder and
``--resume``), :mod:`~gere_hf.continual.data` (each stage's task, the replay and held-out texts, kept disjoint),
:mod:`~gere_hf.continual.launch` (training arguments, DeepSpeed checks, barriers), :mod:`~gere_hf.continual.adapters`
(how each stage's model is put together), :mod:`~gere_hf.continual.hub` (pushing stages, model cards) and
:mod:`~gere_hf.continual.saved_eval` (``gere-hf eval``: a saved model or a run's stage outside a recipe).
"""

from .adapters import AdapterConfig, AdapterError, load_stage_model
from .hub import HubConfig, HubError
from .recipe import EvaluationConfig, ModelConfig, Recipe, RecipeError, StageConfig, load_recipe, parse_recipe
from .runner import RecipeRunner, run_recipe
from .saved_eval import SavedEvalConfig, SavedEvalError, evaluate_saved

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "EvaluationConfig",
    "HubConfig",
    "HubError",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "RecipeRunner",
    "SavedEvalConfig",
    "SavedEvalError",
    "StageConfig",
    "evaluate_saved",
    "load_recipe",
    "load_stage_model",
    "parse_recipe",
    "run_recipe",
]
