"""The training method of a recipe's stages (the ``method`` section): how a stage's trainer, its training arguments
and its training data are made.

``method: {name: sft}`` (the default) trains every stage with :class:`~gere_hf.trainer.GeReSFTTrainer` on the task's
prompt–completion rows, under an ``SFTConfig`` built from the ``training`` section. ``method: {name: sdft, ...}``
trains it with :class:`~gere_hf.sdft.GeReSDFTTrainer` (TRL's self-distillation fine-tuning with GeRe replay) on
:func:`~gere_hf.sdft.sdft_dataset` of the task, under an ``SDFTConfig`` built from the same ``training`` section plus
the method's own options (the other keys of the ``method`` section: ``SDFTConfig``'s generation, teacher and
distillation fields). GeRe replay goes through the same schedule and step loss with either method.

A method is a :class:`TrainingMethod` in :data:`METHODS`; adding one touches this module (and its test) only: the
recipe reads :class:`MethodConfig`, the runner asks it for the stage's arguments, data and trainer. Every option is
checked against its field's annotation in the arguments class and against its range when the recipe is read, before
anything is loaded or written (:func:`parse_method`, :func:`check_method`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import GeReConfigError
from .arguments import check_values
from .errors import RecipeError

logger = logging.getLogger(__name__)

AUTO = "auto"
"""An option value the method fills in per stage from the stage's task (sdft: ``max_completion_length``)."""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingMethod:
    """How a recipe stage trains under one method.

    Args:
        name: the ``method.name`` that selects it.
        summary: one line for error messages and docs.
        trainer_class: returns the trainer class (imported on use).
        args_class: returns the training-arguments class (``SFTConfig`` or a subclass of ``TrainingArguments``).
        args_class_name: how messages name ``args_class`` (e.g. ``trl.experimental.sdft.SDFTConfig``).
        option_fields: returns the keys the ``method`` section may hold besides ``name`` (fields of ``args_class``
            that the ``training`` section does not take).
        defaults: the options gere_hf sets when the recipe leaves them out (others keep the library's default);
            :data:`AUTO` values are filled per stage by ``stage_options``.
        ranges: ``option -> (test, what a valid value is)`` beyond the annotation.
        number_fields: options annotated ``int`` that the library uses as any number.
        train_dataset: the stage's training data from the task's prompt–completion rows.
        stage_options: ``(options, task, tokenizer) -> options`` with the :data:`AUTO` values filled in.
        check_gere: ``(GeReConfig) -> problem or None``: GeRe settings the method cannot train with.
    """

    name: str
    summary: str
    trainer_class: Callable[[], type]
    args_class: Callable[[], type]
    args_class_name: str
    option_fields: Callable[[], list[str]] = lambda: []
    defaults: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)
    number_fields: frozenset = frozenset()
    train_dataset: Callable[[Any], Any] = lambda train: train
    stage_options: Callable[[dict, Any, Any], dict] = lambda options, task, tokenizer: options
    check_gere: Callable[[Any], str | None] = lambda gere: None


METHODS: dict[str, TrainingMethod] = {}


def register_method(method: TrainingMethod) -> TrainingMethod:
    """Add ``method`` to :data:`METHODS` (a recipe's ``method.name`` selects it)."""
    METHODS[method.name] = method
    return method


# -- sft: GeReSFTTrainer, as every recipe trained before the method section --------------------------------------------


def _sft_trainer():
    from ..trainer import GeReSFTTrainer

    return GeReSFTTrainer


def _sft_config():
    from trl import SFTConfig

    return SFTConfig


register_method(TrainingMethod(
    name="sft",
    summary="supervised fine-tuning on the task's completions (GeReSFTTrainer, trl.SFTConfig)",
    trainer_class=_sft_trainer, args_class=_sft_config, args_class_name="trl.SFTConfig",
))


# -- sdft: GeReSDFTTrainer (trl.experimental.sdft) ---------------------------------------------------------------------


@dataclass
class SDFTDefaults:
    """gere_hf's values for the SDFT options a recipe's ``method`` section leaves out. Every other
    ``SDFTConfig`` field (``temperature``, ``distillation_*``, ``max_prompt_length``, ...) keeps TRL's default."""

    teacher_model_kind: str = field(
        default="base",
        metadata={"help": "The teacher SDFT distills towards (it reads the worked example). 'base': the weights under "
                  "the stage's adapter, frozen: the model at the start of the stage with full fine-tuning or "
                  "adapters.strategy stack, the base model with LoRA continue (the adapter disabled); 'ema': an "
                  "exponential moving average of the student (teacher_update_rate, teacher_sync_steps; LoRA: a "
                  "second 'teacher' adapter); 'live': the student itself."},
    )
    num_generations: int = field(
        default=1,
        metadata={"help": "Rollouts per prompt (TRL: 8). SDFT's loss needs no group of rollouts: one keeps a step's "
                  "generation to per_device_train_batch_size sequences."},
    )
    max_completion_length: Any = field(
        default=AUTO,
        metadata={"help": "Tokens a rollout may generate (TRL: 256). 'auto': one more than the stage's longest "
                  "training answer in tokens (room for the end-of-sequence token), so the student generates about "
                  "as much as it is meant to answer; an int fixes it for every stage."},
    )
    teacher_prompt_template: str = field(
        default="Here is a question with its answer:\n{privileged_context}\n\n{prompt}",
        metadata={"help": "The teacher's prompt (gere_hf.sdft.DEFAULT_TEACHER_TEMPLATE): the worked example "
                  "(privileged_context = prompt + completion), then the prompt. Needs {prompt} and "
                  "{privileged_context}."},
    )


def _sdft_module():
    from .. import sdft

    if sdft.GeReSDFTTrainer is None:  # pragma: no cover - depends on the installed trl
        raise RecipeError("method.name: sdft needs trl.experimental.sdft (trl ≥ 1.1), which this trl lacks.")
    return sdft


def _sdft_option_fields() -> list[str]:
    from trl import SFTConfig

    sdft_config = _sdft_module().SDFTConfig
    return sorted(_fields(sdft_config) - _fields(SFTConfig))


def _sdft_train_dataset(train):
    try:
        return _sdft_module().sdft_dataset(train)
    except GeReConfigError as err:
        raise RecipeError(str(err)) from None


def _sdft_stage_options(options: dict, task, tokenizer) -> dict:
    options = dict(options)
    if options.get("max_completion_length") == AUTO:
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in task.train["completion"]]
        options["max_completion_length"] = max(lengths, default=0) + 1
    return options


def _sdft_gere(gere) -> str | None:
    if gere.replay_enabled and gere.ce_reduction != "sample_mean":
        return ("gere.ce_reduction must be 'sample_mean' with method sdft: a step weighs SDFT's per-rollout loss "
                "against the replay samples per sample (SDFT averages each rollout's tokens itself).")
    return None


_SDFT_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "teacher_model_kind": (lambda v: v in ("base", "ema", "live"), "'base', 'ema' or 'live'"),
    "num_generations": (lambda v: v >= 1, "at least 1"),
    "num_generations_eval": (lambda v: v is None or v >= 1, "at least 1, or null (num_generations)"),
    "max_completion_length": (lambda v: v == AUTO or v is None or (type(v) is int and v >= 1),
                              "a number of tokens ≥ 1, 'auto' (the stage's longest answer + 1) or null (no limit)"),
    "max_prompt_length": (lambda v: v is None or v >= 1, "a number of tokens ≥ 1, or null (no truncation)"),
    "generation_batch_size": (lambda v: v is None or v >= 1, "at least 1, or null"),
    "steps_per_generation": (lambda v: v is None or v >= 1, "at least 1, or null"),
    "num_iterations": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "0 (off) or more"),
    "min_p": (lambda v: v is None or (_finite(v) and 0 <= v <= 1), "in [0, 1], or null"),
    "repetition_penalty": (lambda v: _finite(v) and v > 0, "a number > 0"),
    "teacher_update_rate": (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
    "teacher_sync_steps": (lambda v: v >= 1, "at least 1"),
    "distillation_alpha": (lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    "distillation_topk": (lambda v: v is None or v >= 1, "at least 1, or null"),
    "distillation_is_clip": (lambda v: v is None or (_finite(v) and v > 0), "a number > 0, or null (no clipping)"),
    "num_loss_tokens_to_skip": (lambda v: v >= 0, "0 or more"),
    "teacher_prompt_template": (lambda v: "{prompt}" in v and "{privileged_context}" in v,
                                "a template containing {prompt} and {privileged_context}"),
}


register_method(TrainingMethod(
    name="sdft",
    summary="self-distillation fine-tuning on the student's own rollouts (GeReSDFTTrainer, trl SDFTConfig)",
    trainer_class=lambda: _sdft_module().GeReSDFTTrainer,
    args_class=lambda: _sdft_module().SDFTConfig,
    args_class_name="trl.experimental.sdft.SDFTConfig",
    option_fields=_sdft_option_fields,
    defaults={f.name: f.default for f in dataclasses.fields(SDFTDefaults)},
    ranges=_SDFT_RANGES,
    number_fields=frozenset({"temperature", "top_p", "repetition_penalty", "teacher_update_rate",
                             "distillation_alpha", "distillation_is_clip", "vllm_server_timeout",
                             "vllm_gpu_memory_utilization"}),
    train_dataset=_sdft_train_dataset,
    stage_options=_sdft_stage_options,
    check_gere=_sdft_gere,
))


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's method section
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """The ``method`` section: the stages' training method and its options, written side by side
    (``method: {name: sdft, max_completion_length: 16}``)."""

    name: str = field(
        default="sft",
        metadata={"help": "'sft' (GeReSFTTrainer on the task's completions, under trl.SFTConfig) or 'sdft' "
                  "(GeReSDFTTrainer: TRL's self-distillation fine-tuning, under trl.experimental.sdft.SDFTConfig). "
                  "GeRe replay joins either through the same schedule."},
    )
    options: dict = field(
        default_factory=dict,
        metadata={"help": "The method's own options, given as the section's other keys. sdft: SDFTConfig's "
                  "generation, teacher and distillation fields (max_completion_length, teacher_model_kind, ...; "
                  "gere_hf's defaults in docs/sdft.md); sft takes none."},
    )

    @property
    def method(self) -> TrainingMethod:
        return METHODS[self.name]

    def resolved_options(self) -> dict:
        """The options with gere_hf's defaults for those the recipe leaves out (:data:`AUTO` still unresolved)."""
        return {**self.method.defaults, **self.options}

    def build_args(self, kwargs: dict):
        """The stage's training arguments: ``kwargs`` (from the training section; SFT-only keys left null are dropped)
        plus the method's options; :data:`AUTO` options keep the library's default until :meth:`stage_args`."""
        cls = self.method.args_class()
        valid = _fields(cls)
        kwargs = {k: v for k, v in kwargs.items() if k in valid or v is not None}
        options = {k: v for k, v in self.resolved_options().items() if v != AUTO}
        return cls(**kwargs, **options)

    def stage_args(self, args, task, tokenizer) -> dict:
        """Fill the :data:`AUTO` options of stage arguments ``args`` from the stage's task (in place); returns the
        stage's options as trained (what run_state.json records)."""
        options = self.method.stage_options(self.resolved_options(), task, tokenizer)
        for key, value in options.items():
            if self.resolved_options().get(key) == AUTO:
                setattr(args, key, value)
        return {"name": self.name, **options}

    def train_dataset(self, task_train):
        return self.method.train_dataset(task_train)

    def trainer_class(self) -> type:
        return self.method.trainer_class()

    def to_dict(self) -> dict:
        return {"name": self.name, **self.options}


def parse_method(data: Any, where: str = "method") -> MethodConfig:
    """The ``method`` section (a name or a mapping): the name among :data:`METHODS`, every option a field of the
    method's arguments class, of its annotated type and in range."""
    from .recipe import check_keys

    if data is None:
        return MethodConfig()
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a method name ({', '.join(METHODS)}) or a mapping with name: and the "
                          f"method's options, got {type(data).__name__}.")
    options = dict(data)
    name = options.pop("name", "sft")
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        listing = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
        raise RecipeError(f"{where}.name {name!r} is not a training method." + (f" Did you mean {close[0]!r}?"
                          if close else "") + f" Registered methods: {listing}.")
    method = METHODS[name]
    valid = method.option_fields()
    if options and not valid:
        raise RecipeError(f"{where}: the method {name!r} takes no options, got {sorted(options)}. Training arguments "
                          f"go in the training section ({method.args_class_name}).")
    check_keys(options, valid, where, f" See {method.args_class_name} for the {name} options (the training section "
               "holds the TrainingArguments fields).")
    hints = typing.get_type_hints(method.args_class())
    # An option that may be AUTO is judged by its range alone (its annotation knows no 'auto').
    hints = {k: v for k, v in hints.items() if method.defaults.get(k) != AUTO}
    check_values(options, hints, method.ranges, lambda k: f"{where}.{k}", set(method.number_fields))
    return MethodConfig(name=name, options=options)


def check_method(recipe) -> None:
    """The method against the rest of the recipe, before its training arguments are built: training keys the
    method's arguments class lacks (refused unless null), GeRe settings it cannot train with."""
    config: MethodConfig = recipe.method
    method = config.method
    valid = _fields(method.args_class())
    sections = [("training", "training", recipe.training),
                *[(f"stages[{i}] ({s.name}).training", f"stages.{s.name}.training", s.training)
                  for i, s in enumerate(recipe.stages)]]
    for where, dotted, training in sections:
        for key, value in training.items():
            if key not in valid and value is not None:
                raise RecipeError(
                    f"{where}.{key}: method {config.name!r} trains under {method.args_class_name}, which has no "
                    f"{key!r}. Remove it or set it to null (--set {dotted}.{key}=null)."
                    + (" SDFT's lengths are method.max_prompt_length and method.max_completion_length."
                       if config.name == "sdft" else "")
                )
    problem = method.check_gere(recipe.gere)
    if problem:
        raise RecipeError(problem)


def check_tasks(config: MethodConfig, stages: list, tasks: list) -> None:
    """Every stage's task as the method reads it (sdft: prompt and completion columns), before any training."""
    for index, (stage, task) in enumerate(zip(stages, tasks)):
        try:
            config.train_dataset(task.train.select(range(min(1, len(task.train)))))
        except RecipeError as err:
            raise RecipeError(f"stages[{index}] ({stage.name}): method {config.name!r}: {err}") from None


def prepare_stages(config: MethodConfig, stages: list, tasks: list, stage_args: list, tokenizer) -> list[dict]:
    """Check every stage's task as the method reads it and fill its :data:`AUTO` options into its arguments;
    returns each stage's method record (name and options as trained)."""
    check_tasks(config, stages, tasks)
    return [config.stage_args(args, task, tokenizer) for args, task in zip(stage_args, tasks)]


__all__ = ["AUTO", "METHODS", "MethodConfig", "SDFTDefaults", "TrainingMethod", "check_method", "check_tasks",
           "parse_method", "prepare_stages", "register_method"]
