"""Continual recipes: one YAML file describes a whole continual fine-tuning run; :func:`run_recipe` runs it.

A recipe names a model, an optional LoRA config, the GeRe settings, the training arguments and a sequence of stages
(one task each). Stage t starts from what stage t−1 saved; the reference store is built once from the base model and
reused by every stage. Every stage writes ``output_dir/stages/<t>-<name>/`` (adapter or full weights, tokenizer,
trainer state, ``metrics.json``, a model card); ``output_dir/run_state.json`` records the recipe's hash and the
finished stages, so ``--resume`` goes on after the last finished stage (and from the last checkpoint inside an
unfinished one). The accuracy matrix is filled before stage 1 and after every stage; the report is written at the end.

``gere-hf run RECIPE`` runs in one process, or in several under ``torchrun -m gere_hf run`` / ``accelerate launch -m
gere_hf run``: every rank trains, only the main process evaluates and writes, with barriers in between.

Every field is documented in ``docs/recipes.md``. Every check that can fail (unknown keys, datasets and their fields,
DeepSpeed configs, Hub access, ``--resume`` against another recipe) runs before any training.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import adapters as adapters_mod
from .adapters import AdapterConfig, AdapterError
from .config import GeReConfig, GeReConfigError
from .hub import HubConfig, HubError, HubTarget, hub_preflight, model_card, push_stage

logger = logging.getLogger(__name__)

RUN_STATE_FILE = adapters_mod.RUN_STATE_FILE
RUN_STATE_VERSION = 1
STAGES_DIR = "stages"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
BASE_MODEL_DIR = "base_model"
TINY_MODEL = "tiny-random-llama"
# Hub ids of the built-in models, for the model card's base_model metadata.
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Sections that change neither the training nor the evaluation: a resumed run may change them.
UNHASHED_KEYS = ("hub", "overwrite_output_dir", "keep_checkpoints")
# Training arguments the recipe sets elsewhere, and where.
RESERVED_TRAINING_KEYS = {
    "output_dir": "the top-level output_dir (each stage trains in output_dir/stages/<t>-<name>/checkpoints)",
    "resume_from_checkpoint": "`gere-hf run --resume`",
    "push_to_hub": "the hub section (hub.push: true)",
    "hub_model_id": "hub.repo_id",
    "hub_token": "the environment variable named by hub.token_env (never a recipe)",
}
# Training arguments one launch cannot change between stages.
TOP_LEVEL_ONLY_TRAINING_KEYS = ("deepspeed", "fsdp", "fsdp_config", "ddp_backend", "use_cpu")
REPORT_FILES = ("results.json", "report.md", "accuracy_matrix.png", "general_ppl.png", "ap_per_stage.png")


class RecipeError(ValueError):
    """A recipe that cannot run. The message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The ``model`` section: a string (the name or path) or a mapping with these keys."""

    name_or_path: str = field(
        metadata={"help": "A local path, a Hub id, or a built-in name: 'smollm2-135m' (offline SmolLM2-135M-Instruct) "
                  "or 'tiny-random-llama' (a tiny random Llama with the byte-level ByT5 tokenizer, for tests)."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "dtype to load the weights in: float32 (default), bfloat16, float16, auto."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})


@dataclass
class StageConfig:
    """One stage of the sequence: its task's data, how rows become prompt/completion, and training overrides."""

    name: str = field(metadata={"help": "Unique stage name ([A-Za-z0-9._-]); the stage folder is <t>-<name>."})
    dataset: Any = field(
        default=None,
        metadata={"help": "A built-in offline task (wiki_topic, polarity, trivia), a local file/folder or Hub id, or a "
                  "mapping of datasets.load_dataset arguments (path, data_files, name, split, ...)."},
    )
    prompt_field: str | None = field(default=None, metadata={"help": "Column holding the prompt (default 'prompt')."})
    completion_field: str | None = field(
        default=None, metadata={"help": "Column holding the answer (default 'completion', else 'label')."}
    )
    template: str | None = field(
        default=None, metadata={"help": "Prompt as a format string over the row's fields, e.g. 'Review: {text}\\n'."}
    )
    completion_template: str | None = field(default=None, metadata={"help": "The completion as a format string."})
    choices: Any = field(
        default="auto",
        metadata={"help": "'auto' (closed task when ≤ 20 distinct answers), a list of answers, or null (free-form, "
                  "exact match)."},
    )
    num_train: int | None = field(default=None, metadata={"help": "Training examples kept (seeded subset)."})
    num_eval: int | None = field(default=None, metadata={"help": "Evaluation examples kept (seeded subset)."})
    eval_split: Any = field(
        default=None,
        metadata={"help": "The split to evaluate on (a DatasetDict), or the fraction of rows held out (a Dataset)."},
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": "Overrides training.num_train_epochs."})
    learning_rate: float | None = field(default=None, metadata={"help": "Overrides training.learning_rate."})
    max_steps: int | None = field(default=None, metadata={"help": "Overrides training.max_steps."})
    training: dict = field(default_factory=dict, metadata={"help": "Any other training argument for this stage."})


@dataclass
class EvaluationConfig:
    """The ``evaluation`` section: the accuracy matrix and held-out general text measured before and after stages."""

    enabled: bool = field(default=True, metadata={"help": "Evaluate before stage 1 and after every stage."})
    general_texts: int = field(
        default=200, metadata={"help": "Held-out general texts whose perplexity measures general retention (0: none)."}
    )
    general_source: str = field(
        default="wiki",
        metadata={"help": "'wiki' (built-in, disjoint from the wiki replay texts) or a local text file/folder, which "
                  "must not overlap the replay texts."},
    )
    general_text_column: str = field(default="text", metadata={"help": "Text column of general_source."})
    general_max_length: int = field(default=563, metadata={"help": "General texts are cut to this many tokens."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward when scoring task choices."})
    general_batch_size: int = field(default=8, metadata={"help": "Texts per forward for the general perplexity."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation length of free-form tasks."})
    lm_eval_tasks: list = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness tasks also run at every row (optional)."}
    )
    lm_eval_limit: float | None = field(default=None, metadata={"help": "Examples per lm-eval task (None: all)."})


@dataclass
class Recipe:
    """A whole continual run. ``gere-hf run RECIPE.yaml`` reads one from YAML (see docs/recipes.md)."""

    model: ModelConfig = field(metadata={"help": "The base model."})
    stages: list = field(metadata={"help": "The task sequence, in training order (StageConfig entries)."})
    output_dir: str = field(metadata={"help": "Where stages, the store, run_state.json and the report go."})
    name: str | None = field(default=None, metadata={"help": "Run name (report label, Hub {run}); default: "
                                                             "the output_dir's folder name."})
    seed: int = field(default=42, metadata={"help": "Seed of data subsets, LoRA init and training."})
    peft: dict | None = field(
        default=None, metadata={"help": "LoRA options (peft.LoraConfig fields), or null for full fine-tuning."}
    )
    adapters: AdapterConfig | None = field(default=None, metadata={"help": "LoRA across stages: continue or stack."})
    gere: GeReConfig = field(default_factory=GeReConfig, metadata={"help": "GeReConfig fields."})
    training: dict = field(default_factory=dict, metadata={"help": "trl.SFTConfig / TrainingArguments fields."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "What is measured."})
    hub: HubConfig = field(default_factory=HubConfig, metadata={"help": "Pushing finished stages to the Hub."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir that already holds a run (without --resume)."}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep a finished stage's Trainer checkpoints (optimizer states)."}
    )
    raw: dict = field(default_factory=dict, repr=False, metadata={"help": "The recipe as read (overrides applied)."})
    path: str | None = field(default=None, repr=False, metadata={"help": "The recipe file."})

    @property
    def run_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.output_dir)) or "gere-run"

    @property
    def strategy(self) -> str:
        return self.adapters.strategy if self.adapters is not None else "continue"

    @property
    def recipe_hash(self) -> str:
        return recipe_hash(self.raw)


# ----------------------------------------------------------------------------------------------------------------------
# Reading YAML
# ----------------------------------------------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no Python objects) with YAML 1.2 scalars: ``1e-4`` is a float (as users write learning rates)
    and only true/false are booleans (``save_strategy: no`` stays the string 'no', not False); a key given twice in
    one mapping is an error (PyYAML would silently keep the last)."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise RecipeError(f"The key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}).")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, what: str):
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader
    except yaml.YAMLError as err:
        raise RecipeError(f"{what} is not valid YAML: {err}") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key=value`` overrides (``--set``): dotted keys; list items by index or, for stages, by name.

    Values are YAML (``--set training.max_steps=2``, ``--set peft=null``, ``--set stages.polarity.num_train=8``);
    a value that does not parse as YAML is taken as text.
    """
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r} is not KEY=VALUE (e.g. --set training.max_steps=10).")
        try:
            value = _yaml_load(raw_value, f"The value of --set {key}") if raw_value.strip() else None
        except RecipeError:  # not YAML (e.g. a template such as {user}/{run}-{stage}): the text itself
            value = raw_value
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                index = _list_index(node, part, where)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping or a list.")
    return data


def _list_index(items: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise RecipeError(f"--set {where}: index {index} is out of range (the list has {len(items)} items).")
        return index
    names = [x.get("name") if isinstance(x, dict) else None for x in items]
    if part in names:
        return names.index(part)
    close = difflib.get_close_matches(part, [n for n in names if n], n=1)
    raise RecipeError(
        f"--set {where}: no item named {part!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
        + f" Use an index (0..{len(items) - 1}) or a stage name ({', '.join(str(n) for n in names)})."
    )


def recipe_hash(raw: dict) -> str:
    kept = {k: v for k, v in raw.items() if k not in UNHASHED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two raw recipes (sections a resume may change left out)."""
    out: list[str] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if not prefix and k in UNHASHED_KEYS:
                    continue
                walk(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{prefix}[{i}]")
        elif a != b:
            out.append(f"{prefix}: {_short(a)} (run) vs {_short(b)} (recipe)")

    walk(old, new, "")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------------------------------
# From mappings to dataclasses, with typo suggestions
# ----------------------------------------------------------------------------------------------------------------------


def check_keys(data: dict, valid: Sequence[str], where: str, hint: str = "") -> None:
    """Raise a :class:`RecipeError` on the first unknown key, suggesting the closest valid one."""
    valid = list(valid)
    for key in data:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        listing = f" Valid keys: {', '.join(sorted(valid))}." if len(valid) <= 30 else ""
        raise RecipeError(
            f"Unknown key {key!r} in {where}." + (f" Did you mean {close[0]!r}?" if close else "") + listing + hint
        )


_TYPE_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "None": lambda v: v is None,
}


def _check_type(value: Any, annotation: Any, where: str) -> None:
    names = [n.strip() for n in str(annotation).split("|")]
    checks = [_TYPE_CHECKS.get(n.split("[")[0]) for n in names]
    if any(c is None for c in checks):  # a type we do not check (Any, dataclasses): the dataclass judges it
        return
    if not any(c(value) for c in checks):
        raise RecipeError(f"{where} must be {' or '.join(names)}, got {value!r} ({type(value).__name__}).")


def build_dataclass(cls, data: Any, where: str, hint: str = ""):
    """``cls(**data)`` after checking the keys (typo suggestions) and simple types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of {cls.__name__} fields, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(data, list(fields), where, hint)
    for key, value in data.items():
        _check_type(value, fields[key].type, f"{where}.{key}")
    missing = [
        name for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"{where} lacks the required key(s) {missing}.")
    try:
        return cls(**data)
    except (GeReConfigError, HubError, AdapterError) as err:
        raise RecipeError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def _training_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


def _check_training_keys(data: Any, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping of trl.SFTConfig / TrainingArguments fields.")
    check_keys(data, _training_fields() + list(RESERVED_TRAINING_KEYS), where,
               " See trl.SFTConfig and transformers.TrainingArguments for the training arguments.")
    for key, instead in RESERVED_TRAINING_KEYS.items():
        if key in data:
            raise RecipeError(f"{where}.{key} is set by the recipe runner; use {instead} instead.")
    return dict(data)


def parse_recipe(data: Any, path: str | None = None) -> Recipe:
    """Build and check a :class:`Recipe` from its mapping (what the YAML file holds)."""
    if not isinstance(data, dict):
        raise RecipeError(f"A recipe is a YAML mapping (model:, stages:, ...), got {type(data).__name__}.")
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("raw", "path")]
    check_keys(data, top, "the recipe")
    for key in ("model", "stages", "output_dir"):
        if data.get(key) in (None, "", []):
            example = {"model": "model: smollm2-135m", "stages": "stages: [{name: polarity, dataset: polarity}]",
                       "output_dir": "output_dir: runs/my_run"}[key]
            raise RecipeError(f"The recipe has no {key!r}; add it, e.g. `{example}`.")
    _check_type(data["output_dir"], "str", "output_dir")

    model_data = data["model"]
    if isinstance(model_data, str):
        model_data = {"name_or_path": model_data}
    model = build_dataclass(ModelConfig, model_data, "model")

    if not isinstance(data["stages"], list):
        raise RecipeError("stages must be a list of stages (each a mapping with name: and dataset:).")
    stages = []
    for i, stage_data in enumerate(data["stages"]):
        where = f"stages[{i}]" + (f" ({stage_data.get('name')})" if isinstance(stage_data, dict) and
                                  stage_data.get("name") else "")
        stage = build_dataclass(StageConfig, stage_data, where)
        stage.training = _check_training_keys(stage.training, f"{where}.training")
        for key in TOP_LEVEL_ONLY_TRAINING_KEYS:
            if key in stage.training:
                raise RecipeError(
                    f"{where}.training.{key}: one launch uses one distributed setup for all stages; set {key} in the "
                    "top-level training section."
                )
        stages.append(stage)
    _check_stages(stages)

    peft = data.get("peft")
    if peft is not None:
        if not isinstance(peft, dict):
            raise RecipeError("peft must be a mapping of LoRA options (peft.LoraConfig fields), or null.")
        check_keys(peft, adapters_mod.lora_fields(), "peft", " See peft.LoraConfig for the LoRA options.")
        try:
            adapters_mod.lora_config(peft)
        except AdapterError as err:
            raise RecipeError(str(err)) from None
    adapters = None
    if data.get("adapters") is not None:
        if peft is None:
            raise RecipeError(
                "adapters.strategy applies to LoRA adapters, but peft is null (full fine-tuning, where every stage "
                "saves full weights). Remove the adapters section, or give a peft LoRA config (e.g. peft: {r: 16})."
            )
        adapters = build_dataclass(AdapterConfig, data["adapters"], "adapters")

    gere_data = dict(data.get("gere") or {})
    if not isinstance(data.get("gere") or {}, dict):
        raise RecipeError("gere must be a mapping of GeReConfig fields (loss, weight, replay_source, ...).")
    gere_data.setdefault("replay_seed", data.get("seed", 42))
    for key in ("weight", "replay_share"):  # `weight: 0.5`: GeReConfig takes numbers as strings and checks the value
        value = gere_data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gere_data[key] = str(value)
    gere = build_dataclass(GeReConfig, gere_data, "gere")

    training = _check_training_keys(data.get("training"), "training")
    evaluation = build_dataclass(EvaluationConfig, data.get("evaluation"), "evaluation")
    hub = build_dataclass(HubConfig, data.get("hub"), "hub")
    rest = {k: data[k] for k in ("name", "seed", "overwrite_output_dir", "keep_checkpoints") if k in data}
    for key, value in rest.items():
        f = next(f for f in dataclasses.fields(Recipe) if f.name == key)
        _check_type(value, f.type, key)
    recipe = Recipe(model=model, stages=stages, output_dir=data["output_dir"], peft=peft, adapters=adapters,
                    gere=gere, training=training, evaluation=evaluation, hub=hub, raw=data, path=path, **rest)
    if recipe.name is not None:
        _check_name(recipe.name, "name")
    return recipe


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name) or len(name) > 80:
        raise RecipeError(
            f"{where} {name!r} cannot name a folder and a Hub repository: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 80 characters)."
        )


def _check_stages(stages: list[StageConfig]) -> None:
    if not stages:
        raise RecipeError("stages is empty; give at least one stage (name: and dataset:).")
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        _check_name(stage.name, f"stages[{i}].name")
        if stage.name in seen:
            raise RecipeError(
                f"Duplicate stage name {stage.name!r} (stages[{seen[stage.name]}] and stages[{i}]). Stage names name "
                "folders, Hub repositories and accuracy-matrix columns: make them unique (e.g. "
                f"{stage.name}_2)."
            )
        seen[stage.name] = i
        if stage.dataset in (None, "", {}):
            raise RecipeError(
                f"stages[{i}] ({stage.name}) has no dataset. Give a built-in task (wiki_topic, polarity, trivia), a "
                "local file (dataset: data/task.jsonl), a Hub id, or load_dataset arguments "
                "(dataset: {path: json, data_files: data/task.jsonl})."
            )
        if stage.choices is not None and not isinstance(stage.choices, (str, list)):
            raise RecipeError(f"stages[{i}].choices must be 'auto', a list of answers or null.")


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply ``--set`` overrides and check it."""
    if not os.path.isfile(path):
        raise RecipeError(f"The recipe {path!r} does not exist. Give the path of a YAML file, e.g. "
                          "recipes/tiny_cpu.yaml.")
    with open(path, encoding="utf-8") as f:
        data = _yaml_load(f.read(), f"The recipe {path}")
    if not isinstance(data, dict):
        raise RecipeError(f"The recipe {path} must be a YAML mapping (model:, stages:, ...).")
    return parse_recipe(apply_overrides(data, overrides), path=os.path.abspath(path))


# ----------------------------------------------------------------------------------------------------------------------
# Data and configs checked before training
# ----------------------------------------------------------------------------------------------------------------------

_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _resolve_path(path: str, recipe: Recipe) -> str | None:
    """An existing file/folder: as given (relative to the working directory), else next to the recipe file."""
    candidates = [path]
    if recipe.path and not os.path.isabs(path):
        candidates.append(os.path.join(os.path.dirname(recipe.path), path))
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None


def _resolve_data_files(value: Any, recipe: Recipe) -> Any:
    if isinstance(value, str):
        return _resolve_path(value, recipe) or value
    if isinstance(value, list):
        return [_resolve_data_files(v, recipe) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, recipe) for k, v in value.items()}
    return value


def _load_stage_dataset(spec: Any, recipe: Recipe, where: str):
    import inspect

    import datasets

    from .tasks import BUILTIN_TASKS

    if isinstance(spec, str):
        local = _resolve_path(spec, recipe)
        if local is not None and os.path.isfile(local):
            suffix = os.path.splitext(local)[1].lower()
            if suffix not in _DATA_SUFFIXES:
                raise RecipeError(f"{where}: cannot read {local!r} (type {suffix!r}); use one of "
                                  f"{sorted(_DATA_SUFFIXES)} or load_dataset arguments.")
            if os.path.getsize(local) == 0:  # datasets would fail with a bare StopIteration
                raise RecipeError(f"{where}: the dataset file {local!r} is empty. Give a file with the task's examples.")
            kwargs = {"path": _DATA_SUFFIXES[suffix], "data_files": local}
        elif local is not None:
            kwargs = {"path": local}
        elif os.sep in spec or spec.startswith(".") or os.path.splitext(spec)[1].lower() in _DATA_SUFFIXES:
            raise RecipeError(f"{where}: the dataset file {spec!r} does not exist (looked in the working directory "
                              "and next to the recipe).")
        else:
            close = difflib.get_close_matches(spec, BUILTIN_TASKS, n=1, cutoff=0.75)
            if close and "/" not in spec:
                raise RecipeError(f"{where}: unknown dataset {spec!r}. Did you mean the built-in task {close[0]!r}?")
            kwargs = {"path": spec}
    elif isinstance(spec, dict):
        valid = [p for p in inspect.signature(datasets.load_dataset).parameters if p != "config_kwargs"]
        check_keys(spec, valid, f"{where}.dataset", " These are datasets.load_dataset arguments.")
        if "path" not in spec:
            raise RecipeError(f"{where}.dataset needs 'path' (a builder such as json/csv/parquet, a folder or a Hub "
                              "id), e.g. {path: json, data_files: data/train.jsonl}.")
        kwargs = dict(spec)
        if "data_files" in kwargs:
            kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], recipe)
        local = _resolve_path(kwargs["path"], recipe) if isinstance(kwargs["path"], str) else None
        if local is not None and os.path.isdir(local):
            kwargs["path"] = local
    else:
        raise RecipeError(f"{where}.dataset must be a task name, a path or load_dataset arguments, "
                          f"got {type(spec).__name__}.")
    try:
        return datasets.load_dataset(**kwargs)
    except Exception as err:  # offline Hub ids, bad files: say which stage and what was tried
        raise RecipeError(
            f"{where}: datasets.load_dataset({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Check the path (the Hub cannot be "
            "reached offline: give local files)."
        ) from None


def load_stage_task(stage: StageConfig, index: int, recipe: Recipe, exclude: Any = None):
    """The :class:`~gere_hf.tasks.Task` of a stage (named after the stage).

    ``exclude``: texts its eval examples must not overlap (the replay texts; see :class:`gere_hf.replay.ExcludedTexts`).
    """
    from .tasks import BUILTIN_TASKS, TaskDataError, load_builtin_task, task_from_dataset

    where = f"stages[{index}] ({stage.name})"
    try:
        if isinstance(stage.dataset, str) and stage.dataset in BUILTIN_TASKS:
            given = [k for k in ("prompt_field", "completion_field", "template", "completion_template", "eval_split")
                     if getattr(stage, k) is not None]
            if given or stage.choices != "auto":
                raise RecipeError(
                    f"{where}: the built-in task {stage.dataset!r} has its own prompt format and answers; remove "
                    f"{given or ['choices']} (they apply to datasets loaded from files or the Hub)."
                )
            task = load_builtin_task(stage.dataset, stage.num_train, stage.num_eval, recipe.seed, exclude=exclude)
        else:
            dataset = _load_stage_dataset(stage.dataset, recipe, where)
            task = task_from_dataset(
                stage.name, dataset, prompt_field=stage.prompt_field, completion_field=stage.completion_field,
                template=stage.template, completion_template=stage.completion_template, choices=stage.choices,
                num_train=stage.num_train, num_eval=stage.num_eval, eval_split=stage.eval_split, seed=recipe.seed,
                exclude=exclude,
            )
    except TaskDataError as err:
        raise RecipeError(f"{where}: {err}") from None
    if len(task.train) == 0:
        raise RecipeError(f"{where}: the task has no training examples; raise num_train or give more data.")
    task.meta = {**task.meta, "stage": stage.name, "dataset": stage.dataset if isinstance(stage.dataset, str)
                 else json.dumps(stage.dataset, default=str)}
    task.name = stage.name
    return task


def check_deepspeed_config(value: Any, recipe: Recipe, where: str = "training.deepspeed") -> Any:
    """The DeepSpeed config as a path that exists and parses (or an inline mapping); ZeRO-3 must save 16-bit weights.

    Returns what to pass to the training arguments (an absolute path, or the mapping).
    """
    if isinstance(value, dict):
        config, shown = value, "the inline DeepSpeed config"
    elif isinstance(value, str):
        path = _resolve_path(value, recipe)
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


def _uses_deepspeed(recipe: Recipe) -> bool:
    return bool(recipe.training.get("deepspeed")) or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in ("1", "true")


def _disable_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's first init compiles a shared-memory collective op (minutes); gloo does without it."""
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory is best effort
        pass


def _reset_accelerator_state() -> None:
    """Let the next stage's Trainer create its own Accelerator: accelerate refuses a second one with a DeepSpeed
    plugin while the first one's state lives. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _restore_row(evaluator, record: dict) -> None:
    """Put a row measured before an interruption back into the evaluator (``--resume``)."""
    restore = getattr(evaluator, "restore_row", None)
    if callable(restore):
        restore(record)
    else:  # ContinualEvaluator has no public way to refill rows yet: its rows are this dict, keyed by row index
        evaluator._rows[int(record["row"])] = record


# ----------------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------------


class RecipeRunner:
    """Runs a :class:`Recipe`: checks, then row 0, then each stage (train, save, evaluate, push), then the report.

    Args:
        recipe: the recipe.
        resume: continue the run in ``recipe.output_dir`` (same recipe) after its last finished stage.
        on_stage_end: optional ``callback(index, trainer)`` on every rank after stage ``index`` is trained and saved,
            before the trainer is freed (tests compare the trained model with the one rebuilt from disk).
    """

    def __init__(self, recipe: Recipe, resume: bool = False, on_stage_end: Callable | None = None):
        self.recipe = recipe
        self.resume = resume
        self.on_stage_end = on_stage_end
        self.output_dir = os.path.abspath(recipe.output_dir)
        self.state: dict = {}
        self.tasks: list = []
        self.stage_args: list = []
        self.hub: HubTarget | None = None
        self.evaluator = None
        self.tokenizer = None
        self.replay = None
        self.replay_texts: list[str] | None = None
        self.general_selection = None
        self.base_path: str = ""
        self._log_history: dict[int, list] = {}
        self.overwrite = False

    # -- paths ----------------------------------------------------------------------------------------------------------

    def stage_dir(self, index: int) -> str:
        return os.path.join(self.output_dir, STAGES_DIR, f"{index}-{self.recipe.stages[index - 1].name}")

    @property
    def store_dir(self) -> str:
        return os.path.abspath(self.recipe.gere.store_dir or os.path.join(self.output_dir, "gere_store"))

    @property
    def is_main(self) -> bool:
        return self.stage_args[0].process_index == 0 if self.stage_args else int(os.environ.get("RANK", "0")) == 0

    @property
    def world_size(self) -> int:
        return self.stage_args[0].world_size if self.stage_args else int(os.environ.get("WORLD_SIZE", "1"))

    # -- checks before any training -------------------------------------------------------------------------------------

    def _read_previous_run(self) -> dict | None:
        path = os.path.join(self.output_dir, RUN_STATE_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path} is corrupted ({err}); move it away to start over.") from None

    def check_previous_run(self) -> None:
        """``--resume`` needs the same recipe; a fresh run refuses to overwrite a run unless told to."""
        previous = self._read_previous_run()
        self.overwrite = False
        if previous is None:
            # No run here: files named like a run's outputs are someone else's. Never delete them unasked.
            foreign = [p for p in (STAGES_DIR, *REPORT_FILES) if os.path.exists(os.path.join(self.output_dir, p))]
            if foreign and not self.recipe.overwrite_output_dir:
                raise RecipeError(
                    f"{self.output_dir} holds {', '.join(foreign)} but no {RUN_STATE_FILE}: not a gere-hf run this "
                    "one could continue, and this run would overwrite them. Choose another output_dir, move them "
                    "away, or set overwrite_output_dir: true to replace them."
                )
            if self.resume:
                logger.warning("--resume: %s holds no run yet; starting from the beginning.", self.output_dir)
            self.overwrite = bool(foreign)
            self.state = {}
            return
        finished = [s["name"] for s in previous.get("stages", []) if s.get("status") == "finished"]
        if not self.resume:
            if not self.recipe.overwrite_output_dir:
                raise RecipeError(
                    f"{self.output_dir} already holds a run ({len(finished)} finished stage(s): "
                    f"{', '.join(finished) or 'none'}). Pass --resume to continue it, set overwrite_output_dir: true "
                    "(or --set overwrite_output_dir=true) to start over, or choose another output_dir."
                )
            self.overwrite = True
            self.state = {}
            return
        if previous.get("recipe_hash") != self.recipe.recipe_hash:
            diffs = recipe_differences(previous.get("recipe") or {}, self.recipe.raw)
            shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
            raise RecipeError(
                f"--resume: {self.output_dir} was made from a different recipe; these settings differ:\n  "
                f"{shown or '(the recipe hashes differ)'}\nResume with the recipe (and --set overrides) the run was "
                "started with, or start a new run in another output_dir."
            )
        self.state = previous

    def _training_kwargs(self, stage: StageConfig) -> dict:
        import torch

        r = self.recipe
        kwargs: dict[str, Any] = {
            # SFTConfig turns bf16 on by default, even on a CPU; a recipe asks for it explicitly.
            "bf16": False,
            "use_cpu": not torch.cuda.is_available(),
            "report_to": "none",
            "seed": r.seed,
            # TRL's default (on), under transformers' new name: the old one, which SFTConfig sets, warns on every stage.
            "activation_checkpointing": True,
        }
        kwargs.update(r.training)
        kwargs.update(stage.training)
        if "gradient_checkpointing" in kwargs:
            kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        for key in ("num_train_epochs", "learning_rate", "max_steps"):
            if getattr(stage, key) is not None:
                kwargs[key] = getattr(stage, key)
        return kwargs

    def build_training_args(self) -> None:
        """The SFTConfig of every stage (bad values fail here); the first one sets up torch.distributed."""
        import torch
        from trl import SFTConfig

        r = self.recipe
        if _uses_deepspeed(r) and not torch.cuda.is_available():
            _disable_deepspeed_shm_op()
        self.stage_args = []
        for i, stage in enumerate(r.stages, start=1):
            kwargs = self._training_kwargs(stage)
            kwargs["output_dir"] = os.path.join(self.stage_dir(i), CHECKPOINTS_DIR)
            try:
                args = SFTConfig(**kwargs)
                _ = args.world_size  # sets up the devices and the process group now, not inside a stage
            except (TypeError, ValueError) as err:
                raise RecipeError(f"stages[{i - 1}] ({stage.name}): invalid training arguments: {err}") from None
            self.stage_args.append(args)
        if _uses_deepspeed(r) and self.world_size > 1:
            import deepspeed

            # On CPU accelerate sets up torch.distributed itself; DeepSpeed's own comm layer, which zero.Init reads
            # the world size from when a stage loads its model under ZeRO-3, must attach to that process group.
            deepspeed.init_distributed()

    def check_replay(self) -> None:
        """Read the replay texts and check the replay mix against every stage's processes and accumulation steps,
        before anything is written (the tokenizer, needed for the tokens, comes with the base model).

        The replay texts are fixed first: the evaluation data (task eval examples, held-out general texts) is then
        chosen disjoint from them, so they never change with the evaluation settings. With ``gere.loss: none`` they are
        read too, only to keep the evaluation data the same as in the replay runs a no-replay baseline is compared with.
        """
        from .replay import ReplayDataError, load_replay_texts
        from .schedule import ReplaySchedule, ReplayScheduleError

        g = self.recipe.gere
        self.replay_texts = None
        if g.replay_enabled and g.replay_per_step is not None:
            for i, (stage, args) in enumerate(zip(self.recipe.stages, self.stage_args)):
                try:
                    ReplaySchedule(g.replay_num_samples, world_size=args.world_size,
                                   grad_accum=args.gradient_accumulation_steps, per_step=g.replay_per_step)
                except ReplayScheduleError as err:
                    raise RecipeError(f"stages[{i}] ({stage.name}): {err}") from None
        source = _resolve_path(g.replay_source, self.recipe) or g.replay_source
        try:
            self.replay_texts = load_replay_texts(source, g.replay_num_samples, g.replay_seed, g.replay_text_column)
        except ReplayDataError as err:
            if g.replay_enabled:
                raise RecipeError(f"gere.replay_source: {err}") from None
            logger.warning("gere.loss is 'none' and gere.replay_source cannot be read (%s): the evaluation data is not "
                           "kept disjoint from it.", err)
        except Exception as err:  # a Hub id offline, say: a run without replay must not fail on its replay source
            if g.replay_enabled:
                raise
            logger.warning("gere.loss is 'none' and gere.replay_source cannot be read (%s: %s): the evaluation data "
                           "is not kept disjoint from it.", type(err).__name__, err)

    def load_tasks(self) -> None:
        """Every stage's task; eval examples that overlap the replay texts (when read already) are passed over."""
        from .replay import ExcludedTexts

        exclude = ExcludedTexts({"replay": self.replay_texts}) if self.replay_texts else None
        self.tasks = [load_stage_task(stage, i, self.recipe, exclude=exclude)
                      for i, stage in enumerate(self.recipe.stages)]

    def select_general_texts(self):
        """The held-out general texts (a :class:`~gere_hf.replay.TextSelection`, or None when none are measured),
        disjoint from the replay texts and from every task's texts; chosen on every rank, before anything is written,
        so that too few left stops every process alike."""
        from .replay import ExcludedTexts, ReplayDataError, select_heldout_texts

        ev = self.recipe.evaluation
        self.general_selection = None
        if not ev.enabled or ev.general_texts <= 0:
            return None
        exclude = ExcludedTexts({"replay": self.replay_texts or [],
                                 "tasks": [text for task in self.tasks for text in task.texts()]})
        if ev.general_source == "wiki":
            source, seed = "wiki", self.recipe.gere.replay_seed
        else:
            source, seed = _resolve_path(ev.general_source, self.recipe) or ev.general_source, self.recipe.seed
        try:
            self.general_selection = select_heldout_texts(ev.general_texts, seed, source,
                                                          text_column=ev.general_text_column, exclude=exclude)
        except ReplayDataError as err:
            raise RecipeError(
                f"evaluation.general_source ({ev.general_source}, general_texts={ev.general_texts}): {err}"
            ) from None
        return self.general_selection

    def data_overlap(self) -> dict:
        """What keeps the evaluation data apart from the replay texts, with the numbers used (``results.json``)."""
        from .replay import MIN_CONTAINED_CHARS

        g = self.recipe.gere
        general = None
        if self.general_selection is not None:
            general = {"asked": self.recipe.evaluation.general_texts, **self.general_selection.describe()}
        return {
            "rule": "normalised texts (NFKC, casefolded, whitespace collapsed) overlap when equal, or when one "
                    f"contains the other (texts of at least {MIN_CONTAINED_CHARS} characters)",
            "replay": None if self.replay_texts is None else {
                "source": str(g.replay_source), "seed": g.replay_seed, "num_texts": len(self.replay_texts)},
            "tasks": {task.name: {"num_eval": len(task.eval), "num_train": len(task.train),
                                  "eval_dropped_overlap": task.meta.get("eval_dropped_overlap")}
                      for task in self.tasks},
            "general": general,
        }

    # -- model and data -------------------------------------------------------------------------------------------------

    def _load(self, path: str):
        m = self.recipe.model
        return adapters_mod.load_causal_lm(path, m.dtype, m.trust_remote_code)

    def prepare_base_model(self) -> None:
        """The base model's path; the built-in tiny random Llama is saved once into the run folder (main process)."""
        name = self.recipe.model.name_or_path
        if name != TINY_MODEL:
            from .models import BUILTIN_MODELS, resolve_model_path

            if name in BUILTIN_MODELS:
                if self.is_main:
                    resolve_model_path(name)  # converted once, by one process
                _barrier()
                self.base_path = resolve_model_path(name)
            else:
                local = _resolve_path(name, self.recipe)
                self.base_path = local if local is not None and os.path.isdir(local) else name
            return
        self.base_path = os.path.join(self.output_dir, BASE_MODEL_DIR)
        if self.is_main and not os.path.isfile(os.path.join(self.base_path, "config.json")):
            from transformers import ByT5Tokenizer

            from .models import tiny_llama

            tmp = self.base_path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tiny_llama(seed=self.recipe.seed).save_pretrained(tmp)
            ByT5Tokenizer().save_pretrained(tmp)
            os.replace(tmp, self.base_path)
        _barrier()

    def _stage_dirs(self, upto: int) -> list[str]:
        return [self.stage_dir(i) for i in range(1, upto + 1)]

    def load_result_model(self, index: int):
        """The model after stage ``index`` (0: the base), rebuilt from disk as full weights, for evaluation."""
        with adapters_mod.zero3_hidden():
            return adapters_mod.stage_result_model(
                self._load, self.base_path, self._stage_dirs(index), self.recipe.peft, self.recipe.strategy
            )

    # -- evaluation (one place: row 0, every stage, the report) ---------------------------------------------------------

    def make_evaluator(self):
        from .evaluation import ContinualEvaluator

        ev = self.recipe.evaluation
        selection = self.general_selection if self.general_selection is not None else self.select_general_texts()
        general = selection.texts if selection is not None else None
        return ContinualEvaluator(
            self.tasks, general, stage_names=["base"] + [s.name for s in self.recipe.stages],
            label=self.recipe.run_name, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            general_max_length=ev.general_max_length, general_batch_size=ev.general_batch_size,
            lm_eval_task_names=ev.lm_eval_tasks or None, lm_eval_limit=ev.lm_eval_limit,
            progress=sys.stderr.isatty(),
        )

    def evaluate_row(self, row: int) -> dict | None:
        """Evaluate the model after stage ``row`` (0: base) on the main process; store the row in run_state."""
        if self.evaluator is None or not self.is_main:
            return None
        model = self.load_result_model(row).to(self.stage_args[0].device)
        with adapters_mod.zero3_hidden():  # the other ranks wait at a barrier: no collective may run here
            record = self.evaluator.evaluate(model, self.tokenizer, row)
        del model
        _free()
        self.state.setdefault("evaluation", {})[str(row)] = record
        self.save_state()
        return record

    def results(self) -> dict | None:
        if self.evaluator is None:
            return None
        results = self.evaluator.results()
        results["run"] = {
            "name": self.recipe.run_name,
            "recipe": self.recipe.path,
            "recipe_hash": self.recipe.recipe_hash,
            "model": self.recipe.model.name_or_path,
            "method": adapters_mod.method_name(self.recipe.peft, self.recipe.strategy),
            "gere": self.recipe.gere.to_dict(),
            "world_size": self.world_size,
            "stages": [{k: s.get(k) for k in ("index", "name", "dir", "distributed_type", "train", "hub")}
                       for s in self.state["stages"]],
        }
        results["data_overlap"] = self.data_overlap()
        return results

    def write_report(self) -> None:
        from .report import write_report

        results = self.results()
        if results is not None and self.is_main:
            write_report(self.output_dir, results)

    # -- run state ------------------------------------------------------------------------------------------------------

    def save_state(self) -> None:
        if self.is_main:
            self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            _write_json(os.path.join(self.output_dir, RUN_STATE_FILE), self.state)

    def _fresh_state(self) -> dict:
        r = self.recipe
        return {
            "schema_version": RUN_STATE_VERSION,
            "recipe_hash": r.recipe_hash,
            "recipe": {k: v for k, v in r.raw.items() if k != "hub"},
            "recipe_path": r.path,
            "name": r.run_name,
            "model": {"name_or_path": r.model.name_or_path,
                      "path": BASE_MODEL_DIR if r.model.name_or_path == TINY_MODEL else self.base_path,
                      "dtype": r.model.dtype, "trust_remote_code": r.model.trust_remote_code},
            "peft": r.peft,
            "adapters": {"strategy": r.strategy} if r.peft is not None else None,
            "stages": [{"index": i, "name": s.name, "dir": os.path.relpath(self.stage_dir(i), self.output_dir),
                        "status": "pending"} for i, s in enumerate(r.stages, start=1)],
            "evaluation": {},
            "finished": False,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _clear_previous_outputs(self) -> None:
        """A fresh start over an old run (overwrite_output_dir): remove what the old run wrote, nothing else."""
        paths = [os.path.join(self.output_dir, p) for p in (STAGES_DIR, RUN_STATE_FILE, BASE_MODEL_DIR, *REPORT_FILES)]
        if not self.recipe.gere.store_dir:  # a store shared through gere.store_dir is not this run's to remove
            paths.append(self.store_dir)
        for path in paths:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def _stage_entry(self, index: int) -> dict:
        return self.state["stages"][index - 1]

    def _finished(self, index: int) -> bool:
        return self._stage_entry(index).get("status") == "finished"

    # -- stages ---------------------------------------------------------------------------------------------------------

    def _check_store_base(self, model) -> None:
        """A store left at store_dir by another base model would be reused silently ('base' stores skip the weights
        check after stage 1): at stage 1 the model is the base, so compare now."""
        from .reference import MANIFEST, model_weights_hash

        manifest = os.path.join(self.store_dir, MANIFEST)
        if self.recipe.gere.reference != "base" or self.recipe.gere.rebuild_store or not os.path.isfile(manifest):
            return
        with open(manifest, encoding="utf-8") as f:
            stored = json.load(f).get("fingerprint", {}).get("model_weights")
        if stored is not None and stored != model_weights_hash(model):
            raise RecipeError(
                f"The reference store at {self.store_dir} was built from other base-model weights than "
                f"{self.recipe.model.name_or_path}. Point gere.store_dir elsewhere, delete the store, or set "
                "gere.rebuild_store: true."
            )

    def _base_store(self, index: int):
        """The 'base' store for stage ``index`` > 1, opened here: stage 1 built or checked it against the base model,
        and later stages' weights differ from it by design (full fine-tuning, adapters merged by 'stack'), which the
        trainer would otherwise question. None where the trainer opens or builds it itself."""
        from .reference import ReferenceStates

        if index == 1 or not self.recipe.gere.replay_enabled or self.recipe.gere.reference != "base":
            return None
        return ReferenceStates.open_distributed(self.store_dir, verify=False)  # nodes that lack it get rank 0's copy

    def train_stage(self, index: int) -> None:
        from transformers import set_seed

        from .trainer import GeReSFTTrainer

        r = self.recipe
        stage, task, args = r.stages[index - 1], self.tasks[index - 1], self.stage_args[index - 1]
        stage_dir = self.stage_dir(index)
        entry = self._stage_entry(index)
        checkpoint = None
        if self.resume and os.path.isdir(args.output_dir):
            checkpoint = last_complete_checkpoint(args.output_dir)
        logger.info("Stage %d/%d (%s): %d training examples%s", index, len(r.stages), stage.name, len(task.train),
                    f", resuming from {checkpoint}" if checkpoint else "")
        if getattr(args, "hf_deepspeed_config", None) is not None:
            from transformers.integrations.deepspeed import set_hf_deepspeed_config

            set_hf_deepspeed_config(args.hf_deepspeed_config)  # this stage's config decides ZeRO-3 loading
        set_seed(r.seed + index)  # the same fresh LoRA weights on every rank
        model = adapters_mod.training_model(self._load, self.base_path, self._stage_dirs(index - 1), r.peft,
                                            r.strategy)
        if index == 1:
            self._check_store_base(model)
        entry["status"] = "running"
        self.save_state()
        # rebuild_store asks for a fresh store from the base model: at stage 1 only, never from a fine-tuned model.
        gere_config = dataclasses.replace(r.gere, store_dir=self.store_dir,
                                          rebuild_store=r.gere.rebuild_store and index == 1 and checkpoint is None)
        trainer = GeReSFTTrainer(
            model=model, args=args, train_dataset=task.train, processing_class=self.tokenizer,
            gere_config=gere_config, replay_set=self.replay, reference_states=self._base_store(index),
        )
        entry["distributed_type"] = str(getattr(trainer.accelerator.distributed_type, "value",
                                                trainer.accelerator.distributed_type))
        if args.fsdp and entry["distributed_type"] != "FSDP":
            logger.warning("training.fsdp is set but accelerate runs %s: it enables FSDP only on GPUs/accelerators.",
                           entry["distributed_type"])
        check_fsdp_saves_full_weights(trainer.accelerator.state)
        start = time.time()
        output = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(stage_dir)  # every rank: ZeRO-3 gathers the weights; the main process writes
        if self.is_main:
            trainer.state.save_to_json(os.path.join(stage_dir, "trainer_state.json"))
        if self.on_stage_end is not None:
            self.on_stage_end(index, trainer)
        entry["train"] = {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}
        entry["train"]["global_step"] = trainer.state.global_step
        entry["train_seconds"] = round(time.time() - start, 2)
        self._log_history[index] = trainer.state.log_history
        trainer.accelerator.free_memory()
        del trainer, model
        _reset_accelerator_state()
        _free()
        _barrier()

    def finish_stage(self, index: int) -> None:
        """After training: evaluate, write metrics and the model card, mark the stage finished (main process)."""
        r = self.recipe
        stage_dir = self.stage_dir(index)
        record = self.evaluate_row(index)
        entry = self._stage_entry(index)
        if self.is_main:
            task = self.tasks[index - 1]
            metrics = {
                "stage": index, "name": r.stages[index - 1].name, "task": task.describe(),
                "method": adapters_mod.method_name(r.peft, r.strategy), "gere": r.gere.to_dict(),
                "train": entry.get("train"), "train_seconds": entry.get("train_seconds"),
                "evaluation": record, "log_history": self._log_history.pop(index, []),
            }
            _write_json(os.path.join(stage_dir, METRICS_FILE), metrics)
            with open(os.path.join(stage_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self._model_card(index, record, entry.get("train") or {}))
            entry["status"] = "finished"
            if record is not None:
                entry["accuracy"] = record.get("accuracy")
                entry["general"] = record.get("general")
            self.save_state()
            checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
            if not r.keep_checkpoints and os.path.isdir(checkpoints):
                shutil.rmtree(checkpoints)  # the stage's result is saved; its optimizer states are not needed
        _barrier()

    def _model_card(self, index: int, record: dict | None, train: dict) -> str:
        r = self.recipe
        name = r.model.name_or_path
        hub_id = BUILTIN_HUB_IDS.get(name)
        if hub_id is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
            hub_id = name
        keep = ("train_loss", "train_runtime", "global_step", "epoch")
        return model_card(
            run=r.run_name, base_model=name, base_model_hub_id=hub_id, index=index, num_stages=len(r.stages),
            stage=r.stages[index - 1].name, task=self.tasks[index - 1].describe(), stages=[s.name for s in r.stages],
            gere=r.gere.to_dict(), method=adapters_mod.method_name(r.peft, r.strategy),
            metrics={"train": {k: v for k, v in train.items() if k in keep},
                     "accuracy": (record or {}).get("accuracy"), "general": (record or {}).get("general")},
        )

    def push_pending(self) -> None:
        """Push finished stages not pushed yet (main process); a failed push stops the run, the stage stays saved."""
        if self.hub is None:
            return
        if self.is_main:
            for index in range(1, len(self.recipe.stages) + 1):
                entry = self._stage_entry(index)
                if entry.get("status") == "finished" and not entry.get("hub"):
                    entry["hub"] = push_stage(self.hub, self.stage_dir(index), index, entry["name"])
                    self.save_state()
        _barrier()

    # -- the whole run --------------------------------------------------------------------------------------------------

    def run(self) -> dict | None:
        """Run the recipe; returns the results (on the main process; None elsewhere or without evaluation)."""
        r = self.recipe
        t0 = time.time()
        # Everything that can fail on bad input, before anything heavy.
        if r.training.get("deepspeed"):
            r.training["deepspeed"] = check_deepspeed_config(r.training["deepspeed"], r)
        self.check_previous_run()
        if r.hub.push:
            self.hub = hub_preflight(r.hub, r.run_name, [s.name for s in r.stages])
        if r.evaluation.lm_eval_tasks and _zero3_config(r.training.get("deepspeed")):
            raise RecipeError("evaluation.lm_eval_tasks is not supported under ZeRO-3 (lm-eval runs on the main "
                              "process only); drop it or use ZeRO-2.")
        self.build_training_args()
        # The replay texts first: the tasks' eval examples and then the held-out general texts are chosen disjoint
        # from them (and the general texts from the tasks), all before anything is written.
        self.check_replay()
        self.load_tasks()
        self.select_general_texts()

        fresh = not self.state
        if fresh:
            if self.is_main:
                os.makedirs(self.output_dir, exist_ok=True)
                if self.overwrite:  # only an overwrite_output_dir start removes earlier outputs
                    self._clear_previous_outputs()
            _barrier()
        self.prepare_base_model()
        self.tokenizer = adapters_mod.load_tokenizer(self.base_path, r.model.trust_remote_code)
        if r.gere.replay_enabled:
            from .replay import ReplaySet

            g = r.gere
            self.replay = ReplaySet.from_texts(self.replay_texts, self.tokenizer, g.replay_max_length,
                                               source=str(g.replay_source), seed=g.replay_seed)
        # run_state.json is written once the inputs are known good: a run refused for its tokenizer or replay texts
        # leaves no state behind that a second attempt would have to --resume or overwrite.
        if fresh:
            self.state = self._fresh_state()
        self.state["world_size"] = self.world_size
        self.save_state()
        if r.evaluation.enabled and self.is_main:
            self.evaluator = self.make_evaluator()
            for _, record in sorted(self.state.get("evaluation", {}).items(), key=lambda kv: int(kv[0])):
                _restore_row(self.evaluator, record)
        if "0" not in self.state.get("evaluation", {}):
            self.evaluate_row(0)
        _barrier()

        for index in range(1, len(r.stages) + 1):
            if self._finished(index):
                logger.info("Stage %d (%s) is finished; skipping it.", index, r.stages[index - 1].name)
                continue
            self.train_stage(index)
            self.finish_stage(index)
            self.push_pending()
        self.push_pending()

        self.write_report()
        self.state["finished"] = True
        self.state["seconds"] = round(time.time() - t0, 2)
        self.save_state()
        _barrier()
        logger.info("The run is finished: %s", self.output_dir)
        return self.results() if self.is_main else None


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest Trainer checkpoint in ``folder`` that was written to the end, or None.

    ``Trainer`` creates ``checkpoint-N`` first and writes ``trainer_state.json`` into it last, so a process killed while
    saving leaves a newer checkpoint without a readable state: resuming from it fails ("Can't find a valid
    checkpoint") or, with the weights but no state, silently restarts the stage at step 0. Such checkpoints are skipped.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        path = os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
                json.load(f)
            return path
        except (OSError, ValueError):
            logger.warning("Skipping %s: it was not written to the end (the run was interrupted while saving it).",
                           path)
    return None


def _zero3_config(value: Any) -> bool:
    if isinstance(value, dict):
        return (value.get("zero_optimization") or {}).get("stage") == 3
    if isinstance(value, str) and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return (json.load(f).get("zero_optimization") or {}).get("stage") == 3
        except (OSError, ValueError, AttributeError):
            return False
    return False


def run_recipe(
    recipe: str | dict | Recipe,
    resume: bool = False,
    overrides: Sequence[str] = (),
    on_stage_end: Callable | None = None,
) -> dict | None:
    """Run a continual recipe (a YAML path, a mapping or a :class:`Recipe`); returns the results on the main process.

    This is what ``gere-hf run RECIPE [--resume] [--set key=value ...]`` calls.
    """
    if isinstance(recipe, Recipe):
        if overrides:
            recipe = parse_recipe(apply_overrides(recipe.raw, overrides), path=recipe.path)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(apply_overrides(recipe, overrides))
    else:
        recipe = load_recipe(os.fspath(recipe), overrides)
    return RecipeRunner(recipe, resume=resume, on_stage_end=on_stage_end).run()


__all__ = [
    "EvaluationConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "RecipeRunner",
    "StageConfig",
    "apply_overrides",
    "load_recipe",
    "load_stage_task",
    "parse_recipe",
    "run_recipe",
]


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
