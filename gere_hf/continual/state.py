"""The folder of a continual run: its layout, ``run_state.json``, and what ``--resume`` may continue.

``output_dir/run_state.json`` records the recipe (and its hash), the base model (and a fingerprint of its weights),
every stage's folder and status (and, once finished, a fingerprint of its saved weights), and every evaluated row, so
``--resume`` goes on after the last finished stage (and from the last complete checkpoint inside an unfinished one).
It is written atomically by the main process only.

A stage is finished by its checkpoints too: a complete checkpoint at the stage's last step *is* the trained stage
(:func:`final_checkpoint`), whose saved model is taken as it is (:func:`adopt_checkpoint`) rather than trained further.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

from ..evaluation.report import REPORT_FILES
from ..fileio import read_json
from .adapters import adapters_record, load_causal_lm, load_tokenizer, stage_result_model
from .fingerprints import changed_digest, folder_differences, folder_records, records_digest
from .recipe import TINY_MODEL, Recipe, RecipeError, recipe_differences

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run_state.json"
RUN_STATE_VERSION = 1
STAGES_DIR = "stages"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
BASE_MODEL_DIR = "base_model"


def read_run_state(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path} is corrupted ({err}); move it away to start over.") from None
    problem = run_state_problem(state)
    if problem is not None:
        raise RecipeError(
            f"{path} is not a run state gere-hf wrote: {problem}. It was edited or damaged; restore it from a copy, "
            "or move it away to start the run over."
        )
    return state


def run_state_problem(state: Any) -> str | None:
    """What makes ``state`` unusable as a run state (a missing or mistyped field), or None."""
    if not isinstance(state, dict):
        return f"it holds a JSON {type(state).__name__}, not an object"
    for key, kind in (("stages", list), ("model", dict), ("recipe", dict)):
        if not isinstance(state.get(key), kind):
            found = "missing" if key not in state else type(state[key]).__name__
            return f"its {key!r} is {found}, not a {kind.__name__}"
    if not state["stages"]:
        return "its 'stages' list is empty"
    for i, stage in enumerate(state["stages"]):
        if not isinstance(stage, dict) or not all(isinstance(stage.get(k), str) for k in ("name", "dir", "status")):
            return f"stages[{i}] lacks its name, dir or status"
    if not isinstance(state["model"].get("path"), str):
        return "model.path is missing"
    return None


class StageError(ValueError):
    """A stage a run does not have, or has not finished."""


def finished_stages(state: dict) -> int:
    """How many stages of a run are finished, counted from the first (stages finish in order)."""
    stages = state.get("stages", [])
    finished = 0
    while finished < len(stages) and stages[finished].get("status") == "finished":
        finished += 1
    return finished


def resolve_stage(state: dict, stage: int | str | None, run: str) -> int:
    """The index of a finished stage of the run ``run`` (whose run state is ``state``): ``stage`` is its 1-based
    index (an int, or a string of digits), its name, ``"base"`` or 0 for the base model, or None for the last finished
    stage. A stage the run does not have, or has not finished, is a :class:`StageError` naming those it has."""
    stages = state.get("stages", [])
    names = [s["name"] for s in stages]
    finished = finished_stages(state)
    if stage is None:
        return finished
    if isinstance(stage, str) and not stage.lstrip("-").isdigit():
        if stage == "base":
            return 0
        if stage not in names:
            raise StageError(f"The run {run} has no stage {stage!r}; its stages are base, {', '.join(names)}.")
        index = names.index(stage) + 1
    else:
        index = int(stage)
    if not 0 <= index <= len(stages):
        raise StageError(f"There is no stage {index}: the run {run} has stages 0 (base) to {len(stages)}.")
    if index > finished:
        done = ", ".join(names[:finished]) or "none"
        raise StageError(
            f"Stage {index} is not finished in {run} ({names[index - 1]}); the finished stages are 1..{finished} "
            f"({done}; 0 is the base model). Resume the run first (`gere-hf run RECIPE --resume`)."
        )
    return index


def load_stage_model(run_dir: str, stage: int | str | None, merge: bool = False, dtype: str | None = None):
    """Rebuild the model of a finished stage of a recipe run from its folder: ``(model, tokenizer)``.

    Args:
        run_dir: the recipe's ``output_dir`` (it holds ``run_state.json``).
        stage: the stage's 1-based index or its name; 0 (or ``"base"``) is the base model, None the last finished
            stage (:func:`resolve_stage`).
        merge: merge the LoRA adapter(s) into the weights (a plain transformers model).
        dtype: 'float32', 'bfloat16', ... (default: the dtype the run loaded its model in).
    """
    path = os.path.join(run_dir, RUN_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {RUN_STATE_FILE} in {run_dir!r}: give the output_dir of a `gere-hf run`.")
    state = read_json(path)
    index = resolve_stage(state, stage, run_dir)
    info = state["model"]
    trust = bool(info.get("trust_remote_code", False))
    dtype = dtype if dtype is not None else info.get("dtype")
    base = info["path"]
    if not os.path.isabs(base) and os.path.isdir(os.path.join(run_dir, base)):
        base = os.path.join(run_dir, base)  # a base model materialised inside the run folder

    def load(where: str):
        return load_causal_lm(where, dtype, trust)

    dirs = [os.path.join(run_dir, s["dir"]) for s in state["stages"][:index]]
    model = stage_result_model(load, base, dirs, state.get("peft"),
                               (state.get("adapters") or {}).get("strategy", "continue"), merge=merge)
    return model, load_tokenizer(dirs[-1] if dirs else base, trust)


def ever_trained(state: dict) -> bool:
    """Whether any stage of a run began training (its status left 'pending')."""
    return any(s.get("status", "pending") != "pending" for s in state.get("stages", []))


# What a fresh start clears (check_previous_run): nothing, an earlier run's outputs, or those and its default store.
CLEAR_NOTHING, CLEAR_OUTPUTS, CLEAR_ALL = None, "outputs", "all"


def check_previous_run(recipe: Recipe, output_dir: str, resume: bool) -> tuple[dict, str | None]:
    """``(state to continue or {}, what a fresh start clears first: CLEAR_NOTHING, CLEAR_OUTPUTS or CLEAR_ALL)``.

    ``--resume`` needs the same recipe; a fresh run refuses to overwrite a run (or files named like a run's outputs)
    unless ``overwrite_output_dir`` says so. A run that stopped before its first stage trained is started afresh,
    with or without ``--resume``, whatever the recipe: a corrected recipe must not need ``overwrite_output_dir``.
    """
    previous = read_run_state(output_dir)
    if previous is None:
        # No run here: files named like a run's outputs are someone else's. Never delete them unasked.
        foreign = [p for p in (STAGES_DIR, *REPORT_FILES) if os.path.exists(os.path.join(output_dir, p))]
        if foreign and not recipe.overwrite_output_dir:
            raise RecipeError(
                f"{output_dir} holds {', '.join(foreign)} but no {RUN_STATE_FILE}: not a gere-hf run this "
                "one could continue, and this run would overwrite them. Choose another output_dir, move them "
                "away, or set overwrite_output_dir: true to replace them."
            )
        if resume:
            logger.warning("--resume: %s holds no run yet; starting from the beginning.", output_dir)
        return {}, CLEAR_ALL if foreign else CLEAR_NOTHING
    finished = [s["name"] for s in previous.get("stages", []) if s.get("status") == "finished"]
    if not ever_trained(previous) and (previous.get("recipe_hash") != recipe.recipe_hash or not resume):
        # It stopped before training anything: only its base-model evaluation is lost by starting over. Its own
        # outputs are cleared; a store at the default place was not its (stores are built when stage 1 trains).
        logger.warning("%s holds a run that stopped before its first stage trained; starting it afresh.", output_dir)
        return {}, CLEAR_OUTPUTS
    if not resume:
        if not recipe.overwrite_output_dir:
            raise RecipeError(
                f"{output_dir} already holds a run ({len(finished)} finished stage(s): "
                f"{', '.join(finished) or 'none'}). Pass --resume to continue it, set overwrite_output_dir: true "
                "(or --set overwrite_output_dir=true) to start over, or choose another output_dir."
            )
        return {}, CLEAR_ALL
    if previous.get("recipe_hash") != recipe.recipe_hash:
        diffs = recipe_differences(previous.get("recipe") or {}, recipe.raw)
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise RecipeError(
            f"--resume: {output_dir} was made from a different recipe; these settings differ:\n  "
            f"{shown or '(the recipe hashes differ)'}\nResume with the recipe (and --set overrides) the run was "
            "started with, or start a new run in another output_dir."
        )
    return previous, CLEAR_NOTHING


def fresh_run_state(recipe: Recipe, output_dir: str, base_path: str, stage_dirs: list[str],
                    base_weights: dict | None = None) -> dict:
    return {
        "schema_version": RUN_STATE_VERSION,
        "recipe_hash": recipe.recipe_hash,
        "recipe": {k: v for k, v in recipe.raw.items() if k != "hub"},
        "recipe_path": recipe.path,
        "name": recipe.run_name,
        "model": {"name_or_path": recipe.model.name_or_path,
                  "path": BASE_MODEL_DIR if recipe.model.name_or_path == TINY_MODEL else base_path,
                  "dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code,
                  "weights": base_weights},
        "peft": recipe.peft,
        "adapters": adapters_record(recipe.peft, recipe.adapters, len(recipe.stages)),
        "stages": [{"index": i, "name": s.name, "dir": os.path.relpath(stage_dirs[i - 1], output_dir),
                    "status": "pending"} for i, s in enumerate(recipe.stages, start=1)],
        "evaluation": {},
        "finished": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def base_weights_record(base_path: str) -> dict | None:
    """The fingerprint of a local base model's files (config and weights); None for a Hub id (not a folder)."""
    if not os.path.isdir(base_path):
        return None
    records = folder_records(base_path)
    return {"files": records, "digest": records_digest(records)}


def base_weights_changes(base_path: str, record: dict | None) -> str | None:
    """A message when the base model's files differ from the run's record of them, else None."""
    if not record or not os.path.isdir(base_path):
        return None
    differences = folder_differences(base_path, record["files"])
    if not differences:
        return None
    return (f"the base model at {base_path} changed since the run started: its files hash {record['digest']} in the "
            f"run's record and {changed_digest(base_path, record['files'])} now ({'; '.join(differences[:4])})")


def stage_files_record(stage_dir: str) -> dict:
    """The fingerprint of a finished stage's saved model (adapter or full weights, and their configs)."""
    return folder_records(stage_dir)


def stage_files_problem(stage_dir: str, record: dict | None) -> str | None:
    """What differs between a finished stage's folder and the run's record of it, or None (no record: not checked,
    a run of an older gere_hf)."""
    if not record:
        return None
    differences = folder_differences(stage_dir, record)
    return "; ".join(differences[:4]) if differences else None


def clear_previous_outputs(output_dir: str, store_dir: str | None) -> None:
    """A fresh start over an old run (overwrite_output_dir): remove what the old run wrote, nothing else. A store
    shared through gere.store_dir (``store_dir=None`` here) is not the run's to remove."""
    paths = [os.path.join(output_dir, p) for p in (STAGES_DIR, RUN_STATE_FILE, BASE_MODEL_DIR, *REPORT_FILES)]
    if store_dir is not None:
        paths.append(store_dir)
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


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


def checkpoint_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def final_checkpoint(checkpoint: str | None) -> bool:
    """Whether a complete checkpoint is the stage's last step: the Trainer trained the whole stage before it.

    Resuming from it would not be a no-op: the Trainer runs one more step of an epoch that ``max_steps`` ends in the
    middle of (transformers checks ``max_steps`` after a step), so a run killed between that checkpoint and the stage's
    end trained past ``max_steps`` on ``--resume``.
    """
    if checkpoint is None:
        return False
    state = checkpoint_state(checkpoint)
    return int(state.get("max_steps") or 0) > 0 and int(state.get("global_step") or 0) >= int(state["max_steps"])


# What a checkpoint holds to resume training, beside the saved model (which is what save_model writes).
_RESUME_ONLY = ("optimizer", "scheduler", "rng_state", "scaler", "trainer_state.json", "latest", "zero_to_fp32.py",
                "global_step", "pytorch_model_fsdp", "optimizer_")


def adopt_checkpoint(checkpoint: str, stage_dir: str) -> dict:
    """Copy a final checkpoint's saved model (byte for byte what ``Trainer.save_model`` writes) into the stage folder;
    returns the checkpoint's trainer state. Each file goes in atomically; resume-only files are left out."""
    os.makedirs(stage_dir, exist_ok=True)
    for name in sorted(os.listdir(checkpoint)):
        source = os.path.join(checkpoint, name)
        if not os.path.isfile(source) or name.startswith(_RESUME_ONLY):
            continue
        tmp = os.path.join(stage_dir, f".{name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, os.path.join(stage_dir, name))
    return checkpoint_state(checkpoint)
