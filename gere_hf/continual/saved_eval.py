"""``gere-hf eval``: evaluate a saved model, or a stage of a recipe run, outside a recipe (tasks, general NLL, MMLU).

Two kinds of input:

* ``run=`` a recipe's ``output_dir`` and ``stage=`` (0: the base model; default: the last finished stage). The model
  is rebuilt as the run evaluates it (:func:`gere_hf.continual.load_stage_model`); the tasks, held-out texts and the
  MMLU settings default to the run's own, chosen by the same code and seeds, so the numbers match the run's row, and
  the evaluation data is kept disjoint from the run's replay texts.
* ``model=`` a model folder, a Hub id or a built-in name (``smollm2-135m``), or a PEFT adapter folder (merged into
  its base). Tasks are built-in ones by name; the held-out texts and the MMLU questions are kept apart from them.
  A stage folder of a run is refused (its adapters may stack on earlier stages): give the run and the stage.

Every check that can fail on bad input runs before the model is loaded (:func:`prepare_saved_eval`), ``out`` is
created and written to once before anything is measured, and the run's stage folders are checked against the run's
record of them; the results go to ``out/eval.json`` and ``out/eval.md``, neither of which is ever overwritten unless
asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..evaluation.mmlu import MMLUConfig, MMLUDataError, MMLUEvaluator
from ..evaluation.report import acc_se, format_number, markdown_table, package_versions
from ..evaluation.retention import DEFAULT_GENERAL_MAX_LENGTH, general_perplexity, texts_fingerprint
from ..evaluation.scoring import evaluate_tasks
from ..evaluation.tasks import BUILTIN_TASKS, TaskDataError, load_builtin_task
from ..fileio import atomic_write_text, write_json
from ..models import BUILTIN_MODELS, DTYPE_NAMES
from ..replay import ReplayDataError, looks_like_path, read_error_text, select_heldout_texts, without_api_hints
from . import data
from .adapters import base_with_merged, load_causal_lm, load_tokenizer
from .recipe import RecipeError, parse_recipe
from .state import (
    RUN_STATE_FILE,
    STAGES_DIR,
    StageError,
    load_stage_model,
    read_run_state,
    resolve_stage,
    stage_files_problem,
)

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
EVAL_REPORT = "eval.md"


class SavedEvalError(ValueError):
    """Input of ``gere-hf eval`` that cannot be evaluated. The message names the problem and the fix."""


@dataclass
class SavedEvalConfig:
    """What ``gere-hf eval`` measures, and on which model."""

    out: str = field(metadata={"help": "Folder of eval.json and eval.md."})
    model: str | None = field(default=None, metadata={"help": "A model folder, Hub id, built-in name or adapter folder."})
    run: str | None = field(default=None, metadata={"help": "A recipe run's output_dir (with stage)."})
    stage: int | str | None = field(
        default=None, metadata={"help": "With run: 0 (base), a stage index or name; default the last finished one."}
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Task names: built-in ones with model, the run's stage names with run (default: all of the "
                  "run's; [] for none)."},
    )
    num_eval: int | None = field(default=None, metadata={"help": "Eval examples per built-in task (model only)."})
    general: int | None = field(
        default=None, metadata={"help": "Held-out general texts (default: the run's number; 0 with model)."}
    )
    general_source: str | None = field(default=None, metadata={"help": "'wiki' or a text file (default: the run's)."})
    general_max_length: int | None = field(default=None, metadata={"help": "Tokens per general text (default 563)."})
    mmlu: Any = field(
        default=None,
        metadata={"help": "An MMLUConfig (or its fields as a mapping), False for none; default (None): the run's "
                  "evaluation.mmlu, or none."},
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the data subsets (default: the run's, else 0)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward when scoring task choices."})
    dtype: str | None = field(default=None, metadata={"help": "dtype to load the model in (default: the run's/fp32)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing out/eval.json."})


@dataclass
class PreparedEval:
    """Everything a saved-model evaluation needs but the model: checked inputs and the chosen data."""

    config: SavedEvalConfig
    describe: dict
    load_model: Any
    tasks: list
    general_texts: list[str] | None
    general_max_length: int
    general_selection: Any
    mmlu: Any


def _read_state(run: str) -> dict:
    state = read_run_state(run)
    if state is None:
        raise SavedEvalError(f"No {RUN_STATE_FILE} in {run!r}: --run takes the output_dir of a `gere-hf run`.")
    return state


def _run_stage(state: dict, stage: int | str | None, run: str) -> int:
    try:
        return resolve_stage(state, stage, run)
    except StageError as err:
        raise SavedEvalError(str(err)) from None


def _mmlu_config(value: Any):
    if value is None or value is False:
        return None
    if isinstance(value, MMLUConfig):
        return value
    if isinstance(value, dict):
        try:
            return MMLUConfig(**value)
        except (TypeError, ValueError) as err:
            raise SavedEvalError(f"MMLU settings: {err}") from None
    raise SavedEvalError(f"mmlu must be an MMLUConfig or a mapping of its fields, got {type(value).__name__}.")


def _check_out(config: SavedEvalConfig) -> None:
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise SavedEvalError(f"--out {config.out} is a file; give a folder (it is created if missing).")
    for name in (EVAL_FILE, EVAL_REPORT):
        path = os.path.join(config.out, name)
        if os.path.exists(path) and not config.overwrite:
            raise SavedEvalError(f"{path} exists; choose another --out or pass --overwrite to replace it.")


def _make_out(config: SavedEvalConfig) -> None:
    """Create ``out`` and write into it once, before the model is loaded: a folder that cannot be written is found
    now, not after the measurement."""
    probe = os.path.join(config.out, f".gere-eval-probe-{os.getpid()}")
    try:
        os.makedirs(config.out, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as err:
        raise SavedEvalError(f"--out {config.out} cannot be written ({err.strerror or err}); give a folder you can "
                             "write to.") from None


def _check_stage_folders(run: str, state: dict, stage: int) -> None:
    """Stages 1..stage must hold what the run saved: a truncated adapter or another run's copied in is refused."""
    for entry in state["stages"][:stage]:
        problem = stage_files_problem(os.path.join(run, entry["dir"]), entry.get("files"))
        if problem:
            raise SavedEvalError(
                f"Stage {entry.get('index')} ({entry['name']}) of {run} is not what the run saved ({problem}): it was "
                f"truncated, altered or replaced. Restore {entry['dir']} from a copy, or rerun the stage."
            )


def _check_base_exists(base: str, where: str) -> None:
    """A base model named by a path that is not there (a moved run, an adapter made elsewhere) fails in transformers
    as an invalid Hub id; say what is missing instead."""
    if base in BUILTIN_MODELS or os.path.exists(base):
        return
    if os.path.isabs(base) or looks_like_path(base) or base.count("/") != 1:
        raise SavedEvalError(
            f"{where} names the base model {base!r}, which does not exist here. Put the base model there, or point "
            "it at the base model's folder or Hub id."
        )


def _prepare_run(config: SavedEvalConfig) -> PreparedEval:
    run = os.path.abspath(config.run)
    state = _read_state(run)
    stage = _run_stage(state, config.stage, run)
    _check_stage_folders(run, state, stage)
    base = state["model"]["path"]
    if not os.path.isabs(base) and os.path.isdir(os.path.join(run, base)):
        base = os.path.join(run, base)
    _check_base_exists(base, f"The run state of {run} (model.path)")
    raw = dict(state["recipe"], output_dir=run)
    try:
        recipe = parse_recipe(raw, path=state.get("recipe_path"))
    except RecipeError as err:
        raise SavedEvalError(f"The recipe recorded in {run} no longer parses: {err}") from None
    if config.seed is not None:
        recipe.seed = config.seed
    replay = data.load_run_replay_texts(recipe)
    tasks = data.load_stage_tasks(recipe, replay)
    if config.tasks is not None:
        names = [t.name for t in tasks]
        unknown = [n for n in config.tasks if n not in names]
        if unknown:
            raise SavedEvalError(f"--tasks {unknown}: the run's tasks are {', '.join(names)}.")
        tasks = [t for t in tasks if t.name in config.tasks]
    ev = recipe.evaluation
    general = config.general if config.general is not None else (ev.general_texts if ev.enabled else 0)
    mmlu = ev.mmlu if config.mmlu is None else _mmlu_config(config.mmlu)
    recipe.evaluation = dataclasses.replace(
        ev, enabled=True, general_texts=general, mmlu=mmlu,
        general_source=config.general_source or ev.general_source,
        general_max_length=config.general_max_length or ev.general_max_length)
    try:
        selection = data.select_general_texts(recipe, replay, tasks)
        mmlu_evaluator = data.select_mmlu(recipe, replay, tasks)
    except RecipeError as err:
        text = str(err) if config.general is None else str(err).replace("evaluation.general_texts", "--general")
        raise SavedEvalError(text) from None
    describe = {"run": run, "stage": stage, "stage_name": "base" if stage == 0 else state["stages"][stage - 1]["name"],
                "model": state["model"]["name_or_path"], "seed": recipe.seed,
                "replay_texts_excluded": None if replay is None else len(replay)}
    return PreparedEval(config, describe, lambda: load_stage_model(run, stage, merge=True, dtype=config.dtype), tasks,
                        None if selection is None else selection.texts, recipe.evaluation.general_max_length,
                        selection, mmlu_evaluator)


def _is_run_stage_folder(path: str) -> tuple[str, str] | None:
    stages_dir, folder = os.path.split(os.path.normpath(os.path.abspath(path)))
    run, name = os.path.split(stages_dir)
    if name == STAGES_DIR and os.path.isfile(os.path.join(run, RUN_STATE_FILE)):
        return run, folder
    return None


def _load_plain(name: str, dtype: str | None):
    """A saved model as a run loads one; an adapter folder is merged into the base model its config names."""
    def load(path):
        return load_causal_lm(path, dtype)

    config_path = os.path.join(name, "adapter_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        tokenizer_here = any(os.path.isfile(os.path.join(name, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        return base_with_merged(load, base, [name]), load_tokenizer(name if tokenizer_here else base)
    return load(name), load_tokenizer(name)


def _num_eval_text(message: str, num_eval: int | None) -> str:
    """A built-in task's size error in ``--num-eval``'s terms: the task's training examples are held apart (the eval
    examples are those a run evaluates), so only the rest can be evaluated."""
    sizes = re.search(r"Task '([^']+)' has (\d+) examples but num_train \+ num_eval = (\d+) \+ (\d+)", message)
    if sizes is None or num_eval is None:
        return f"--tasks: {message}"
    name, available, train = sizes.group(1), int(sizes.group(2)), int(sizes.group(3))
    return (f"--num-eval {num_eval}: the built-in task {name!r} has {available} examples, {train} of them its training "
            f"examples (held apart so that the eval examples are those a run evaluates): at most {available - train} "
            f"can be evaluated. Ask for --num-eval {available - train} or fewer.")


def _prepare_model(config: SavedEvalConfig) -> PreparedEval:
    name = config.model
    looks_local = os.sep in name or name.startswith(".") or os.path.exists(name)
    if looks_local and not os.path.exists(name):
        raise SavedEvalError(f"--model {name}: no such folder.")
    if looks_local:
        stage = _is_run_stage_folder(name)
        if stage is not None:
            raise SavedEvalError(
                f"--model {name} is the stage folder {stage[1]} of the run {stage[0]}; its adapters may stack on the "
                f"earlier stages' weights. Evaluate it with --run {stage[0]} --stage {stage[1].split('-', 1)[0]}.")
        if not any(os.path.isfile(os.path.join(name, f)) for f in ("config.json", "adapter_config.json")):
            raise SavedEvalError(f"--model {name} holds neither config.json nor adapter_config.json: not a saved model.")
        adapter_config = os.path.join(name, "adapter_config.json")
        if os.path.isfile(adapter_config):
            with open(adapter_config, encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
            if not base:
                raise SavedEvalError(f"--model {name}: the adapter config names no base model "
                                     "(base_model_name_or_path); load and merge it yourself.")
            _check_base_exists(base, f"--model {name}: its {adapter_config} (base_model_name_or_path)")
    elif name not in BUILTIN_MODELS and name.count("/") != 1:
        raise SavedEvalError(f"--model {name}: not a folder, a built-in model ({', '.join(BUILTIN_MODELS)}) or a Hub "
                             "id (owner/name).")
    seed = config.seed if config.seed is not None else 0
    names = list(config.tasks or [])
    unknown = [n for n in names if n not in BUILTIN_TASKS]
    if unknown:
        raise SavedEvalError(f"--tasks {unknown}: with --model the tasks are built-in ones ({', '.join(BUILTIN_TASKS)});"
                             " a run's own tasks are evaluated with --run.")
    try:
        tasks = [load_builtin_task(n, num_eval=config.num_eval, seed=seed) for n in names]
    except TaskDataError as err:
        raise SavedEvalError(_num_eval_text(str(err), config.num_eval)) from None
    exclude = {"tasks": [text for task in tasks for text in task.texts()]}
    selection = None
    if config.general:
        try:
            selection = select_heldout_texts(config.general, seed, config.general_source or "wiki", exclude=exclude)
        except ReplayDataError as err:
            text = without_api_hints(str(err), "--general").replace("The replay source", "The general source")
            raise SavedEvalError(f"--general {config.general}: {text}") from None
        except Exception as err:  # a general source that does not parse or is not UTF-8
            text = read_error_text(err, f"--general-source {config.general_source}")
            raise SavedEvalError(text.format(kind="jsonl/json/parquet/csv/txt")) from None
    mmlu = None
    config_mmlu = _mmlu_config(config.mmlu)
    if config_mmlu is not None:
        try:
            mmlu = MMLUEvaluator(config_mmlu, seed=seed, exclude=exclude)
        except MMLUDataError as err:
            raise SavedEvalError(f"MMLU: {err}") from None
    describe = {"model": name, "seed": seed, "replay_texts_excluded": None}
    return PreparedEval(config, describe, lambda: _load_plain(name, config.dtype), tasks,
                        None if selection is None else selection.texts,
                        config.general_max_length or DEFAULT_GENERAL_MAX_LENGTH, selection, mmlu)


def prepare_saved_eval(config: SavedEvalConfig) -> PreparedEval:
    """Check the input and choose the data (tasks, held-out texts, MMLU questions), without loading the model."""
    if (config.model is None) == (config.run is None):
        raise SavedEvalError("Give exactly one of --model PATH_OR_NAME and --run RUN_DIR.")
    if config.stage is not None and config.run is None:
        raise SavedEvalError("--stage applies to --run; with --model the model is what is evaluated.")
    if config.num_eval is not None and config.run is not None:
        raise SavedEvalError("--num-eval applies to --model's built-in tasks; a run's tasks keep the run's examples.")
    if config.general is not None and config.general < 0:
        raise SavedEvalError(f"--general must be 0 or more texts, got {config.general}.")
    if config.dtype is not None and config.dtype not in (*DTYPE_NAMES, "auto"):
        raise SavedEvalError(f"--dtype {config.dtype}: use float32, bfloat16, float16 or auto.")
    _check_out(config)
    prepared = _prepare_run(config) if config.run is not None else _prepare_model(config)
    if not prepared.tasks and not prepared.general_texts and prepared.mmlu is None:
        raise SavedEvalError("Nothing to evaluate: give --tasks, --general N or --mmlu N.")
    _make_out(config)
    return prepared


def _markdown(result: dict) -> str:
    where = (f"stage {result['stage']} ({result['stage_name']}) of the run `{result['run']}`" if "run" in result
             else f"`{result['model']}`")
    out = [f"# Evaluation of {where}", ""]
    if result.get("accuracy"):
        out += ["## Tasks", "", markdown_table(["Task", "Accuracy"], [[k, format_number(v)] for k, v in result["accuracy"].items()]),
                ""]
    general = result.get("general")
    if general:
        out += ["## General capability (held-out text)", "",
                f"{general['num_texts']} texts, NLL {general['nll']:.4f} nats/token, PPL {general['ppl']:.2f} "
                f"({general['tokens']} tokens).", ""]
    mmlu = result.get("mmlu")
    if mmlu:
        q = result.get("mmlu_questions") or {}
        out += ["## MMLU", "", f"{mmlu['num_questions']} questions ({q.get('source')}, seed {q.get('seed')}, "
                f"fingerprint `{q.get('fingerprint')}`), {mmlu['shots']}-shot, {mmlu['formulation']} form; chance "
                f"{mmlu['chance']:.2f}.", "",
                markdown_table(["", "Accuracy ± SE", "Questions"],
                       [["Overall (micro)", acc_se(mmlu), str(mmlu["num_questions"])],
                        ["Macro (mean over subjects)", acc_se({"accuracy": mmlu["macro_accuracy"],
                                                                 "se": mmlu["macro_se"]}), str(mmlu["num_subjects"])],
                        *[[name, acc_se(c), str(c["num_questions"])] for name, c in mmlu["categories"].items()]]),
                ""]
    out.append(f"Took {result['seconds']:.1f} s.")
    return "\n".join(out) + "\n"


def evaluate_saved(config: SavedEvalConfig) -> dict:
    """Check the input, load the model, measure, write ``out/eval.json`` and ``out/eval.md``; returns the results."""
    prepared = prepare_saved_eval(config)
    start = time.perf_counter()
    model, tokenizer = prepared.load_model()
    model.eval()
    result: dict[str, Any] = dict(prepared.describe)
    result["tasks"] = [t.describe() for t in prepared.tasks]
    result["accuracy"] = evaluate_tasks(model, tokenizer, prepared.tasks, batch_size=config.batch_size) \
        if prepared.tasks else {}
    result["general"] = None
    if prepared.general_texts:
        result["general"] = general_perplexity(model, tokenizer, prepared.general_texts, prepared.general_max_length)
        result["general_texts"] = {"num_texts": len(prepared.general_texts),
                                   "fingerprint": texts_fingerprint(prepared.general_texts),
                                   "max_length": prepared.general_max_length,
                                   **({"selection": prepared.general_selection.describe()}
                                      if prepared.general_selection is not None else {})}
    if prepared.mmlu is not None:
        result["mmlu"] = prepared.mmlu.evaluate(model, tokenizer)
        result["mmlu_questions"] = prepared.mmlu.describe()
    result["seconds"] = time.perf_counter() - start
    result["versions"] = package_versions()
    write_json(os.path.join(config.out, EVAL_FILE), result)
    atomic_write_text(os.path.join(config.out, EVAL_REPORT), _markdown(result))
    logger.info("Wrote %s", os.path.join(config.out, EVAL_FILE))
    return result


def summary_lines(result: dict) -> list[str]:
    """What ``gere-hf eval`` prints."""
    lines = [f"{k}: {v:.4f}" for k, v in (result.get("accuracy") or {}).items()]
    if result.get("general"):
        g = result["general"]
        lines.append(f"general NLL: {g['nll']:.4f} (PPL {g['ppl']:.2f}, {g['num_texts']} texts)")
    if result.get("mmlu"):
        m = result["mmlu"]
        lines.append(f"MMLU ({m['formulation']}, {m['shots']}-shot, {m['num_questions']} questions): "
                     f"{m['accuracy']:.4f} ± {m['se']:.4f} ("
                     + ", ".join(f"{k} {c['accuracy']:.3f}" for k, c in m["categories"].items()) + ")")
    return lines


__all__ = ["EVAL_FILE", "PreparedEval", "SavedEvalConfig", "SavedEvalError", "evaluate_saved", "prepare_saved_eval",
           "summary_lines"]

