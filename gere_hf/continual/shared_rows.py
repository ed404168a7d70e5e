"""A recipe runner that shares the base model's evaluation (row 0 of the accuracy matrix) between runs.

Runs that differ only in how they train (the replay loss, its weight, the learning rate: the demo's losses, a sweep's
arms at one seed) evaluate the same base model on the same tasks and held-out texts, so row 0 is measured by the
first of them and read back by the others from a file. What may be shared is the caller's call: it names the file;
runs whose tasks, seeds, replay texts or evaluation settings differ must not share one (``gere-hf sweep`` keys the
file on everything that changes row 0).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

from ..fileio import write_json
from .runner import RecipeRunner


class SharedBaseRowRunner(RecipeRunner):
    """A :class:`RecipeRunner` whose row 0 comes from ``base_row_path`` when a run before it wrote one there.

    Args:
        recipe, resume: as :class:`RecipeRunner`.
        base_row_path: the file of the shared row 0 (written by the first run that measures it).
        say: optional ``say(message)`` for one progress line per evaluation and stage.
    """

    def __init__(self, recipe, resume: bool, base_row_path: str, say: Callable[[str], None] | None = None):
        super().__init__(recipe, resume=resume)
        self.base_row_path = base_row_path
        self.say = say or (lambda _message: None)

    def _shared_base_row(self) -> dict | None:
        if not os.path.isfile(self.base_row_path):
            return None
        with open(self.base_row_path, encoding="utf-8") as f:
            return json.load(f)

    def evaluate_row(self, row: int) -> dict | None:
        base_row = self._shared_base_row() if row == 0 else None
        if base_row is not None and self.evaluator is not None:
            record = copy.deepcopy(base_row)
            self.evaluator.restore_row(record)
            self.state.setdefault("evaluation", {})["0"] = record
            self.save_state()
            self.say("base model evaluation reused from an earlier run")
            return record
        what = "base model" if row == 0 else f"stage {row}/{len(self.recipe.stages)}"
        self.say(f"evaluating the {what} ...")
        record = super().evaluate_row(row)
        if record is not None:
            if row == 0:
                write_json(self.base_row_path, record)
            acc = ", ".join(f"{k}={v:.2f}" for k, v in record["accuracy"].items())
            general = record.get("general")
            extra = f", general NLL {general['nll']:.3f}" if general else ""
            mmlu = record.get("mmlu")
            extra += f", MMLU {mmlu['accuracy']:.3f} ± {mmlu['se']:.3f}" if mmlu else ""
            self.say(f"{what}: {acc}{extra} ({record['seconds']:.0f} s)")
        return record

    def train_stage(self, index: int) -> None:
        stage = self.recipe.stages[index - 1]
        self.say(f"training stage {index}/{len(self.recipe.stages)} ({stage.name}, "
                 f"{self.stage_args[index - 1].max_steps} steps) ...")
        super().train_stage(index)
        train = self._stage_entry(index).get("train") or {}
        loss = train.get("train_loss")
        self.say(f"stage {index} trained in {self._stage_entry(index).get('train_seconds', 0):.0f} s"
                 + (f" (mean train loss {loss:.3f})" if isinstance(loss, (int, float)) else ""))


__all__ = ["SharedBaseRowRunner"]
