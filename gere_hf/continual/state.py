"""The folder of a continual run: its layout, ``run_state.json``, and what ``--resume`` may continue.

``output_dir/run_state.json`` records the recipe (and its hash), the base model, every stage's folder and status, and
every evaluated row, so ``--resume`` goes on after the last finished stage (and from the last complete checkpoint inside
an unfinished one). It is written atomically by the main process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from typing import Any

from .recipe import TINY_MODEL, Recipe, RecipeError, recipe_differences

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run_state.json"
RUN_STATE_VERSION = 1
STAGES_DIR = "stages"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
BASE_MODEL_DIR = "base_model"
REPORT_FILES = ("results.json", "report.md", "accuracy_matrix.png", "general_ppl.png", "ap_per_stage.png", "mmlu.png")


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (a temporary file, then a rename): an interrupted write never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: Any) -> None:
    """Write one JSON object a line, atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def read_run_state(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RUN_STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path} is corrupted ({err}); move it away to start over.") from None


def check_previous_run(recipe: Recipe, output_dir: str, resume: bool) -> tuple[dict, bool]:
    """``(state to continue or {}, whether a fresh start must clear an earlier run's outputs)``.

    ``--resume`` needs the same recipe; a fresh run refuses to overwrite a run (or files named like a run's outputs)
    unless ``overwrite_output_dir`` says so.
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
        return {}, bool(foreign)
    finished = [s["name"] for s in previous.get("stages", []) if s.get("status") == "finished"]
    if not resume:
        if not recipe.overwrite_output_dir:
            raise RecipeError(
                f"{output_dir} already holds a run ({len(finished)} finished stage(s): "
                f"{', '.join(finished) or 'none'}). Pass --resume to continue it, set overwrite_output_dir: true "
                "(or --set overwrite_output_dir=true) to start over, or choose another output_dir."
            )
        return {}, True
    if previous.get("recipe_hash") != recipe.recipe_hash:
        diffs = recipe_differences(previous.get("recipe") or {}, recipe.raw)
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise RecipeError(
            f"--resume: {output_dir} was made from a different recipe; these settings differ:\n  "
            f"{shown or '(the recipe hashes differ)'}\nResume with the recipe (and --set overrides) the run was "
            "started with, or start a new run in another output_dir."
        )
    return previous, False


def fresh_run_state(recipe: Recipe, output_dir: str, base_path: str, stage_dirs: list[str]) -> dict:
    return {
        "schema_version": RUN_STATE_VERSION,
        "recipe_hash": recipe.recipe_hash,
        "recipe": {k: v for k, v in recipe.raw.items() if k != "hub"},
        "recipe_path": recipe.path,
        "name": recipe.run_name,
        "model": {"name_or_path": recipe.model.name_or_path,
                  "path": BASE_MODEL_DIR if recipe.model.name_or_path == TINY_MODEL else base_path,
                  "dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code},
        "peft": recipe.peft,
        "adapters": {"strategy": recipe.strategy} if recipe.peft is not None else None,
        "stages": [{"index": i, "name": s.name, "dir": os.path.relpath(stage_dirs[i - 1], output_dir),
                    "status": "pending"} for i, s in enumerate(recipe.stages, start=1)],
        "evaluation": {},
        "finished": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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
