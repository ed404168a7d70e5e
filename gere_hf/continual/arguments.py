"""The ``training`` and ``peft`` sections of a recipe: every stage's training arguments
(:func:`stage_training_kwargs`), checked when the recipe is read with the libraries' own argument classes, and every
error named by its recipe key.

``TrainingArguments``/``SFTConfig`` and ``LoraConfig`` take almost any value and fail much later, inside a stage:
``learning_rate: fast`` is a ``TypeError`` in the optimizer, ``gradient_accumulation_steps: 0`` a
``ZeroDivisionError``, ``max_steps: -3`` trains 12 steps, ``r: four`` fails when the adapter is created and
``peft_type: IA3`` silently trains LoRA (recipes take the types of :data:`~gere_hf.continual.adapters.ADAPTER_TYPES`:
LoRA and OSF, each checked against its own config class). Here every value is checked against its field's annotation
in the library class, then against the range that makes sense, then the classes are built exactly as the runner
builds them, all before anything is loaded or written. Target modules are checked against the model's module names by
:mod:`gere_hf.continual.preflight`, once the model's config is known.
"""

from __future__ import annotations

import enum
import math
import re
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .adapters import ADAPTER_TYPES, AdapterError, adapter_type, peft_config
from .errors import RecipeError

if TYPE_CHECKING:
    from .recipe import Recipe, StageConfig


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> (test, what a valid value is). Only values the libraries accept and then misuse are listed.
TRAINING_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: _finite(v) and v >= 0, "a finite number ≥ 0 (e.g. 2e-4)"),
    "per_device_train_batch_size": (lambda v: v >= 1, "at least 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 1 or v == -1, "a number of optimizer steps ≥ 1, or -1 to train num_train_epochs"),
    "num_train_epochs": (lambda v: _finite(v) and v > 0, "a number of epochs > 0"),
    "max_length": (lambda v: v is None or v >= 1, "a number of tokens ≥ 1, or null (no truncation)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number ≥ 0"),
    "max_grad_norm": (lambda v: _finite(v) and v >= 0, "a finite number ≥ 0 (0: no clipping)"),
    "warmup_steps": (lambda v: _finite(v) and v >= 0, "≥ 0 (a number of steps, or a fraction of them below 1)"),
    "adam_beta1": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "logging_steps": (lambda v: _finite(v) and v > 0, "> 0 (a number of steps, or a fraction of them below 1)"),
    "save_steps": (lambda v: _finite(v) and v > 0, "> 0 (a number of steps, or a fraction of them below 1)"),
    "save_total_limit": (lambda v: v is None or v >= 1, "at least 1, or null (keep all)"),
    "dataloader_num_workers": (lambda v: v >= 0, "0 or more"),
}
# The ranges of each adapter type's fields are in its registry entry (adapters.ADAPTER_TYPES).
LORA_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = ADAPTER_TYPES["LORA"].ranges


# ----------------------------------------------------------------------------------------------------------------------
# Values against annotations
# ----------------------------------------------------------------------------------------------------------------------


def matches_annotation(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be what the annotation ``hint`` asks for. Unknown kinds of annotation pass (the
    library judges them)."""
    if hint is Any or hint is None:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_annotation(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(matches_annotation(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, str) and value in {str(m.value) for m in hint}
    return True


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    for prefix in ("<class '", "'>"):
        text = text.replace(prefix, "")
    return text


def check_values(data: dict, hints: dict, ranges: dict, where: Callable[[str], str],
                 numbers: set[str] = frozenset()) -> None:
    """Each value of ``data`` against its field's annotation, then its range; a :class:`RecipeError` names the key."""
    for key, value in data.items():
        hint = hints.get(key)
        if hint is not None:
            fits = matches_annotation(value, float if key in numbers else hint)
            if not fits:
                raise RecipeError(f"{where(key)} must be {_describe(hint)}, got {value!r} ({type(value).__name__}).")
        if key in ranges:
            test, valid = ranges[key]
            try:
                ok = bool(test(value))
            except TypeError:  # a type the annotation let through (a string where a union allows one)
                ok = False
            if not ok:
                raise RecipeError(f"{where(key)} must be {valid}, got {value!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------


def _training_hints() -> dict:
    from trl import SFTConfig

    return typing.get_type_hints(SFTConfig)


def stage_training_kwargs(recipe: Recipe, stage: StageConfig, index: int = 1) -> dict:
    """The SFTConfig arguments of stage ``index`` (1-based): the runner's defaults, then the recipe's training section,
    then the stage's own (``training:`` and its shortcuts); the stage's tracked-run name from ``tracking``."""
    import torch

    kwargs: dict[str, Any] = {
        # SFTConfig turns bf16 on by default, even on a CPU; a recipe asks for it explicitly.
        "bf16": False,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "seed": recipe.seed,
        # TRL's default (on), under transformers' new name: the old one, which SFTConfig sets, warns on every stage.
        "activation_checkpointing": True,
    }
    kwargs.update(recipe.training)
    kwargs.update(stage.training)
    kwargs["run_name"] = recipe.tracking.stage_run_name(recipe.run_name, index, stage.name)
    if recipe.tracking.project and "project" not in kwargs:
        kwargs["project"] = recipe.tracking.project
    if "gradient_checkpointing" in kwargs:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    for key in ("num_train_epochs", "learning_rate", "max_steps"):
        if getattr(stage, key) is not None:
            kwargs[key] = getattr(stage, key)
    return kwargs


def training_key_origins(recipe: Recipe, stage: StageConfig, index: int) -> dict[str, str]:
    """Where each training argument of stage ``index`` (1-based) comes from in the recipe, as a dotted key."""
    where = f"stages[{index - 1}] ({stage.name})"
    origins = {k: f"training.{k}" for k in recipe.training}
    origins.update({k: f"{where}.training.{k}" for k in stage.training})
    origins.update({k: f"{where}.{k}" for k in ("num_train_epochs", "learning_rate", "max_steps")
                    if getattr(stage, k) is not None})
    if "gradient_checkpointing" in origins:  # the runner passes it under transformers' new name
        origins["activation_checkpointing"] = origins.pop("gradient_checkpointing")
    return origins


def _key_in_message(message: str, given: dict) -> str | None:
    """The recipe key an error message is about: one it names, else one whose value it quotes ("bogus is not a valid
    SchedulerType")."""
    for key in sorted(given, key=len, reverse=True):
        if key in message:
            return key
    quoted = [k for k, v in given.items() if isinstance(v, (str, int, float)) and len(str(v)) > 1
              and re.search(rf"(?<![\w.]){re.escape(str(v))}(?![\w.])", message)]
    return quoted[0] if len(quoted) == 1 else None


def check_training(recipe: Recipe) -> None:
    """Every stage's training arguments: types and ranges by recipe key, then ``SFTConfig`` built as the runner
    builds it (DeepSpeed configs aside: :func:`gere_hf.continual.launch.check_deepspeed_config` reads them)."""
    hints = _training_hints()
    for index, stage in enumerate(recipe.stages, start=1):
        kwargs = stage_training_kwargs(recipe, stage, index)
        origins = training_key_origins(recipe, stage, index)
        given = {k: v for k, v in kwargs.items() if k in origins}
        check_values(given, hints, TRAINING_RANGES, lambda k, o=origins: o[k])
        _check_adapter_learning_rate(recipe, kwargs, origins)
        kwargs.pop("deepspeed", None)
        kwargs["output_dir"] = "checkpoints"  # never created: building the arguments writes nothing
        try:
            recipe.method.build_args(kwargs)  # SFTConfig, or the method's own arguments class (method section)
        except Exception as err:  # the library's own checks (enums, strategies, combinations)
            text = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip(".")
            options = recipe.method.options
            key = _key_in_message(text, {**given, **options})
            where = origins[key] if key in origins else f"method.{key}" if key else None
            prefix = where or f"stages[{index - 1}] ({stage.name}): the training arguments"
            classes = recipe.method.method.args_class_name
            raise RecipeError(f"{prefix}: {text}. See transformers.TrainingArguments and {classes}.") from None


def _check_adapter_learning_rate(recipe: Recipe, kwargs: dict, origins: dict) -> None:
    """A stage's learning rate against its adapter type's limit (OSF trains at full fine-tuning's scale). Plain SGD
    is left alone: its step scales with the gradient, where an adaptive optimizer moves every coordinate by about
    the learning rate."""
    kind = adapter_type(recipe.peft)
    rate = kwargs.get("learning_rate")
    if kind is None or kind.learning_rate_limit is None or rate is None or str(kwargs.get("optim")) == "sgd":
        return
    limit, why = kind.learning_rate_limit
    if rate > limit:
        where = origins.get("learning_rate", "training.learning_rate")
        raise RecipeError(f"{where} = {rate:g} is too high for peft.peft_type {kind.peft_type} (refused above "
                          f"{limit:g}): {why}. Set a learning rate of full fine-tuning's scale (e.g. 1e-5 to 5e-5).")


# ----------------------------------------------------------------------------------------------------------------------
# peft
# ----------------------------------------------------------------------------------------------------------------------


def check_peft(options: dict) -> None:
    """The ``peft`` section: an adapter type of :data:`~gere_hf.continual.adapters.ADAPTER_TYPES` (a recipe's stages
    merge, stack and continue its adapters), every value of the type and range its config class needs, then the
    config built as the runner builds it."""
    try:
        kind = adapter_type(options)
    except AdapterError as err:
        raise RecipeError(str(err)) from None
    check_values(options, typing.get_type_hints(kind.config_cls()), kind.ranges, lambda k: f"peft.{k}",
                 kind.number_fields)
    try:
        peft_config(options)
    except AdapterError as err:
        raise RecipeError(str(err)) from None


__all__ = ["LORA_RANGES", "TRAINING_RANGES", "check_peft", "check_training", "check_values", "matches_annotation",
           "stage_training_kwargs", "training_key_origins"]
