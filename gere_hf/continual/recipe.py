"""Continual recipes: the schema of the YAML file that describes a whole continual fine-tuning run, and its loading.

A recipe names a model, an optional LoRA config, the GeRe settings, the training arguments and a sequence of stages
(one task each). :func:`load_recipe` reads a YAML file, applies ``--set`` overrides (:func:`apply_overrides`) and
checks every field (:func:`parse_recipe`: unknown keys with typo suggestions, types, names); the
:class:`~gere_hf.continual.runner.RecipeRunner` runs the result. Every field is documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import GeReConfig, GeReConfigError
from ..evaluation.mmlu import MMLUConfig
from ..evaluation.tasks import CLOSED_DEFAULT_SCORING, SCORING_MODES
from ..models import DTYPE_NAMES
from . import adapters as adapters_mod
from .adapters import AdapterConfig, AdapterError
from .arguments import check_peft, check_training
from .errors import RecipeError
from .hub import HubConfig, HubError
from .methods import MethodConfig, check_method, parse_method
from .tracking import TrackingConfig

TINY_MODEL = "tiny-random-llama"
# Sections that change neither the training nor the evaluation: a resumed run may change them.
UNHASHED_KEYS = ("hub", "tracking", "overwrite_output_dir", "keep_checkpoints")
# Settings inside sections that say how to get a result, not what it is: `gere.rebuild_store` rebuilds the same store
# (from the same base model, checked), e.g. after a shared store was damaged.
UNHASHED_NESTED_KEYS = {"gere": ("rebuild_store",)}
# dtypes a model can be loaded in (model.dtype), as adapters.load_causal_lm reads them.
MODEL_DTYPES = (*DTYPE_NAMES, "auto")
# Training arguments the recipe sets elsewhere, and where.
RESERVED_TRAINING_KEYS = {
    "output_dir": "the top-level output_dir (each stage trains in output_dir/stages/<t>-<name>/checkpoints)",
    "resume_from_checkpoint": "`gere-hf run --resume`",
    "push_to_hub": "the hub section (hub.push: true)",
    "hub_model_id": "hub.repo_id",
    "hub_token": "the environment variable named by hub.token_env (never a recipe)",
    "run_name": "tracking.run_name (a template: every stage is its own tracked run)",
}
# Training arguments one launch cannot change between stages.
TOP_LEVEL_ONLY_TRAINING_KEYS = ("deepspeed", "fsdp", "fsdp_config", "ddp_backend", "use_cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------------


def check_scoring(value: Any, where: str) -> None:
    """A scoring mode of :data:`gere_hf.evaluation.tasks.SCORING_MODES`, or a ValueError naming the valid ones."""
    if value not in SCORING_MODES:
        close = difflib.get_close_matches(str(value), list(SCORING_MODES), n=1)
        raise ValueError(
            f"{where} must be one of {', '.join(SCORING_MODES)}, got {value!r}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )


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

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in MODEL_DTYPES:
            close = difflib.get_close_matches(str(self.dtype), MODEL_DTYPES, n=1)
            raise ValueError(f"dtype {self.dtype!r} is not a dtype a model loads in; use float32 (the default), "
                             "bfloat16, float16 or auto." + (f" Did you mean {close[0]!r}?" if close else ""))


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
    scoring: str | None = field(
        default=None,
        metadata={"help": "How the task's eval examples are scored: 'loglik' (rank the choices by summed "
                  "log-likelihood), 'loglik_norm' (per token), 'generate' (greedy generation, exact match of the label: "
                  "the O-LoRA / GeRe paper protocol). Default: evaluation.scoring; free-form tasks always generate."},
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": "Overrides training.num_train_epochs."})
    learning_rate: float | None = field(default=None, metadata={"help": "Overrides training.learning_rate."})
    max_steps: int | None = field(default=None, metadata={"help": "Overrides training.max_steps."})
    training: dict = field(default_factory=dict, metadata={"help": "Any other training argument for this stage."})

    def __post_init__(self) -> None:
        if self.scoring is not None:
            check_scoring(self.scoring, "scoring")
        if self.num_eval is not None and self.num_eval < 1:
            raise ValueError(f"num_eval must be at least 1 (or absent: all), got {self.num_eval}.")


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
    max_new_tokens: int = field(
        default=16, metadata={"help": "Generation length (tokens) of generated answers; a closed task's is raised to "
                              "one more than its longest label."}
    )
    scoring: str = field(
        default=CLOSED_DEFAULT_SCORING,
        metadata={"help": "Scoring of closed tasks whose stage sets none: 'loglik', 'loglik_norm' or 'generate' (see "
                  "stages[].scoring). Free-form tasks always generate."},
    )
    choice_eos: bool = field(
        default=True,
        metadata={"help": "Whether a choice's log-likelihood includes the end-of-sequence token TRL trains after the "
                  "completion (true: the score also requires stopping after the label, as generation + exact match "
                  "does). Both variants are recorded either way."},
    )
    lm_eval_tasks: list = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness tasks also run at every row (optional)."}
    )
    lm_eval_limit: float | None = field(default=None, metadata={"help": "Examples per lm-eval task (None: all)."})
    mmlu: MMLUConfig | None = field(
        default=None,
        metadata={"help": "MMLU at every row: a mapping of MMLUConfig fields (num_questions, shots, formulation, "
                  "source, seed, batch_size, max_length); {} for the defaults, null (default) for none."},
    )

    def __post_init__(self) -> None:
        check_scoring(self.scoring, "scoring")
        for key, low in (("general_texts", 0), ("general_max_length", 2), ("batch_size", 1),
                         ("general_batch_size", 1), ("max_new_tokens", 1)):
            value = getattr(self, key)
            if value < low:
                what = " (0: no general texts measured)" if key == "general_texts" else ""
                raise ValueError(f"{key} must be at least {low}{what}, got {value}.")


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
        default=None, metadata={"help": "Adapter options: peft.LoraConfig fields (the default), or peft.OSFConfig "
                                "fields with peft_type: OSF; null for full fine-tuning."}
    )
    adapters: AdapterConfig | None = field(
        default=None, metadata={"help": "Adapters across stages: continue or stack (OSF: its rank schedule)."}
    )
    gere: GeReConfig = field(default_factory=GeReConfig, metadata={"help": "GeReConfig fields."})
    method: MethodConfig = field(
        default_factory=MethodConfig, metadata={"help": "The stages' training method: sft (default) or sdft, with its "
                                                "options (gere_hf.continual.methods.MethodConfig)."}
    )
    training: dict = field(default_factory=dict, metadata={"help": "trl.SFTConfig / TrainingArguments fields."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "What is measured."})
    hub: HubConfig = field(default_factory=HubConfig, metadata={"help": "Pushing finished stages to the Hub."})
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig, metadata={"help": "Run names and group of the stages' tracked runs."}
    )
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

    def stage_peft(self, index: int) -> dict | None:
        """The ``peft`` options stage ``index`` (1-based) trains with (OSF: its scheduled preserved rank)."""
        return adapters_mod.stage_peft_options(self.peft, self.adapters, index, len(self.stages))


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


def _hashed(raw: dict) -> dict:
    """What a recipe's hash covers: the raw recipe without the sections and settings a resumed run may change."""
    kept = {k: v for k, v in raw.items() if k not in UNHASHED_KEYS}
    for section, keys in UNHASHED_NESTED_KEYS.items():
        if isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k not in keys}
    return kept


def recipe_hash(raw: dict) -> str:
    return hashlib.sha256(json.dumps(_hashed(raw), sort_keys=True, default=str).encode()).hexdigest()[:16]


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

    walk(_hashed(old), _hashed(new), "")
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
    except (TypeError, ValueError, GeReConfigError, HubError, AdapterError) as err:
        text = str(err)
        # "dtype 'x' is not ..." from ModelConfig reads "model.dtype 'x' is not ...": the message names the key.
        sep = "." if text.split(" ", 1)[0] in fields else ": "
        raise RecipeError(f"{where}{sep}{text}") from None


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
            raise RecipeError("peft must be a mapping of adapter options (peft.LoraConfig fields, or peft.OSFConfig "
                              "fields with peft_type: OSF), or null.")
        try:
            kind = adapters_mod.adapter_type(peft)
        except AdapterError as err:
            raise RecipeError(str(err)) from None
        check_keys(peft, kind.fields(), "peft", f" See peft.{kind.config_class} for the {kind.label} options.")
        check_peft(peft)
    adapters = None
    if data.get("adapters") is not None:
        if peft is None:
            raise RecipeError(
                "adapters.strategy applies to LoRA adapters, but peft is null (full fine-tuning, where every stage "
                "saves full weights). Remove the adapters section, or give a peft LoRA config (e.g. peft: {r: 16})."
            )
        adapters = build_dataclass(AdapterConfig, data["adapters"], "adapters")
    if peft is not None:
        try:
            adapters_mod.check_adapters(peft, adapters, len(stages))
        except AdapterError as err:
            raise RecipeError(str(err)) from None

    if not isinstance(data.get("gere") or {}, dict):
        raise RecipeError("gere must be a mapping of GeReConfig fields (loss, weight, replay_source, ...).")
    if "seed" in data:  # before gere: the seed is gere.replay_seed's default, which would be blamed for it
        _check_type(data["seed"], "int", "seed")
    gere_data = dict(data.get("gere") or {})
    gere_data.setdefault("replay_seed", data.get("seed", 42))
    for key in ("weight", "replay_share"):  # `weight: 0.5`: GeReConfig takes numbers as strings and checks the value
        value = gere_data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gere_data[key] = str(value)
    gere = build_dataclass(GeReConfig, gere_data, "gere")
    method = parse_method(data.get("method"))

    training = _check_training_keys(data.get("training"), "training")
    evaluation = build_dataclass(EvaluationConfig, data.get("evaluation"), "evaluation")
    if evaluation.mmlu is not None:
        evaluation.mmlu = build_dataclass(MMLUConfig, evaluation.mmlu, "evaluation.mmlu",
                                          " See docs/recipes.md (evaluation.mmlu).")
    hub = build_dataclass(HubConfig, data.get("hub"), "hub")
    tracking = build_dataclass(TrackingConfig, data.get("tracking"), "tracking")
    rest = {k: data[k] for k in ("name", "seed", "overwrite_output_dir", "keep_checkpoints") if k in data}
    for key, value in rest.items():
        f = next(f for f in dataclasses.fields(Recipe) if f.name == key)
        _check_type(value, f.type, key)
    recipe = Recipe(model=model, stages=stages, output_dir=data["output_dir"], peft=peft, adapters=adapters,
                    gere=gere, method=method, training=training, evaluation=evaluation, hub=hub, tracking=tracking,
                    raw=data, path=path, **rest)
    if recipe.name is not None:
        _check_name(recipe.name, "name")
    check_method(recipe)
    check_training(recipe)
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


__all__ = [
    "EvaluationConfig",
    "ModelConfig",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "apply_overrides",
    "load_recipe",
    "parse_recipe",
]
