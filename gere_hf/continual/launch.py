"""One launch of a continual run: every stage's ``SFTConfig`` (from
:func:`~gere_hf.continual.arguments.stage_training_kwargs`), the DeepSpeed config checks, and the collectives the
runner synchronises its processes with.

``gere-hf run RECIPE`` runs in one process, or in several under ``torchrun -m gere_hf run`` / ``accelerate launch -m
gere_hf run``: every rank trains, only the main process evaluates and writes, with barriers in between.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from typing import Any

from ..locks import FolderLockedError, NotAFolderError
from .arguments import stage_training_kwargs
from .data import resolve_recipe_path
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)


def build_stage_args(recipe: Recipe, checkpoint_dirs: list[str]) -> list:
    """The SFTConfig of every stage (bad values fail here); the first one sets up torch.distributed."""
    import torch

    if uses_deepspeed(recipe) and not torch.cuda.is_available():
        _disable_deepspeed_shm_op()
    stage_args = []
    for i, (stage, checkpoints) in enumerate(zip(recipe.stages, checkpoint_dirs), start=1):
        kwargs = stage_training_kwargs(recipe, stage, i)
        kwargs["output_dir"] = checkpoints
        try:
            args = recipe.method.build_args(kwargs)  # SFTConfig, or the method's arguments class
            _ = args.world_size  # sets up the devices and the process group now, not inside a stage
        except (TypeError, ValueError) as err:
            raise RecipeError(f"stages[{i - 1}] ({stage.name}): invalid training arguments: {err}") from None
        stage_args.append(args)
    if uses_deepspeed(recipe) and stage_args[0].world_size > 1:
        import deepspeed

        # On CPU accelerate sets up torch.distributed itself; DeepSpeed's own comm layer, which zero.Init reads
        # the world size from when a stage loads its model under ZeRO-3, must attach to that process group.
        deepspeed.init_distributed()
    return stage_args


def check_deepspeed_config(value: Any, recipe: Recipe, where: str = "training.deepspeed") -> Any:
    """The DeepSpeed config as a path that exists and parses (or an inline mapping); ZeRO-3 must save 16-bit weights.

    Returns what to pass to the training arguments (an absolute path, or the mapping).
    """
    if isinstance(value, dict):
        config, shown = value, "the inline DeepSpeed config"
    elif isinstance(value, str):
        path = resolve_recipe_path(value, recipe)
        if path is None or not os.path.isfile(path):
            raise RecipeError(
                f"{where}: the DeepSpeed config {value!r} does not exist (looked in the working directory and next "
                "to the recipe). Give the path of a JSON file, e.g. recipes/deepspeed/zero2.json."
            )
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecipeError(f"{where}: the DeepSpeed config {path} does not parse as JSON ({err}). Fix the file "
                              "(recipes/deepspeed/*.json are valid examples).") from None
        shown, value = path, path
    else:
        raise RecipeError(f"{where} must be the path of a DeepSpeed JSON file or a mapping, got {type(value).__name__}.")
    if not isinstance(config, dict):
        raise RecipeError(f"{where}: {shown} must hold a JSON object, got {type(config).__name__}.")
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise RecipeError(f"{where}: zero_optimization in {shown} must be a mapping.")
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise RecipeError(
            f"{where}: {shown} uses ZeRO-3 without \"stage3_gather_16bit_weights_on_model_save\": true. Each stage "
            "saves its weights (or adapter) for the next stage and the evaluation; add that setting to "
            "zero_optimization."
        )
    if zero.get("stage") == 3 and zero.get("stage3_prefetch_bucket_size", 1) != 0:
        logger.warning(
            "%s: ZeRO-3 with parameter prefetch. With SFTTrainer's fused LM head and GeRe's replay forward, ZeRO-3 can "
            "have lm_head's weight in flight when the fused head gathers it ('Cannot partition a param in flight'); "
            "set \"stage3_prefetch_bucket_size\": 0 if it happens (docs/compatibility.md).", shown,
        )
    return value


def uses_deepspeed(recipe: Recipe) -> bool:
    return bool(recipe.training.get("deepspeed")) or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in ("1", "true")


def sharded_launch(recipe: Recipe, args) -> str | None:
    """'FSDP' or 'ZeRO-3' when the launch shards the parameters (``training.fsdp``/``training.deepspeed`` or an
    accelerate config), else None; ``args`` are the stages' training arguments as built."""
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if zero3_config(recipe.training.get("deepspeed")) or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "ZeRO-3"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true")


def _disable_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's first init compiles a shared-memory collective op (minutes); gloo does without it."""
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def zero3_config(value: Any) -> bool:
    """Whether a DeepSpeed config (a mapping or the path of a JSON file) is ZeRO stage 3."""
    if isinstance(value, dict):
        return (value.get("zero_optimization") or {}).get("stage") == 3
    if isinstance(value, str) and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return (json.load(f).get("zero_optimization") or {}).get("stage") == 3
        except (OSError, ValueError, AttributeError):
            return False
    return False




def check_fsdp_saves_full_weights(accelerator_state) -> None:
    """Under FSDP every stage must be saved as a loadable folder (the next stage and the evaluation load it), and the
    Trainer's save_model writes weights only with a full state dict: with SHARDED_STATE_DICT it writes none."""
    plugin = getattr(accelerator_state, "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        raise RecipeError(
            f"FSDP saves with {plugin.state_dict_type}, with which the Trainer writes no weights for a stage; the next "
            "stage and the evaluation load each stage's folder. Set fsdp_state_dict_type: FULL_STATE_DICT in the "
            "accelerate config (recipes/accelerate/fsdp2.yaml does) or state_dict_type in training.fsdp_config."
        )


def on_main_process(fn) -> None:
    """Run ``fn`` on the main process only (taking the run folder's lock); its refusal is raised on every rank as the
    same :class:`RecipeError`, so that no rank goes on alone into a collective the others never reach."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            fn()
        except (RecipeError, FolderLockedError, NotAFolderError) as err:
            error = str(err)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RecipeError(error)


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory is best effort
        pass


def launch_distributed_type():
    """The launch's own distributed type (PartialState's, as TrainingArguments set it up), before any Accelerator
    writes its plugin's type (FSDP, DEEPSPEED) over it; None if no PartialState exists yet."""
    from accelerate.state import PartialState

    return PartialState._shared_state.get("distributed_type")


def reset_accelerator_state(launch_type=None) -> None:
    """Let the next stage's Trainer create its own Accelerator: accelerate refuses a second one with a DeepSpeed
    plugin while the first one's state lives. The process group (PartialState) is kept, with the launch's own
    distributed type given back: AcceleratorState writes FSDP into PartialState's shared state, and the next
    AcceleratorState, reading that, would skip its FSDP set-up and have no plugin (seen on an H200: stage 2 failed
    with "'AcceleratorState' object has no attribute 'is_fsdp2'")."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if launch_type is not None and PartialState._shared_state:
        PartialState._shared_state["distributed_type"] = launch_type
