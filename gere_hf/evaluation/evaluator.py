"""The evaluator of a continual run: every task (and held-out general text) after every stage, the accuracy matrix ``R``
and the JSON-ready results that :func:`gere_hf.evaluation.report.write_report` writes."""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

from .metrics import continual_metrics
from .retention import DEFAULT_GENERAL_MAX_LENGTH, general_perplexity, lm_eval_tasks, texts_fingerprint
from .scoring import score_tasks
from .tasks import Task

logger = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1


class ContinualEvaluator:
    """Evaluates every task (and held-out general text) after every stage of a continual run.

    Call ``evaluate(model, tokenizer, 0)`` on the base model, then ``evaluate(model, tokenizer, t)`` after stage t
    (task ``tasks[t - 1]`` trained); :meth:`results` gives the JSON-ready results for
    :func:`gere_hf.evaluation.report.write_report`.

    Args:
        tasks: the task sequence, in training order.
        general_texts: held-out general texts (e.g. ``gere_hf.replay.replay_heldout_texts(200, seed)``) whose NLL
            measures general-capability retention; ``None`` skips it.
        stage_names: names of rows 0..T (default ``"base"`` and the task names).
        label: the run's label in comparisons (e.g. ``"gere"``, ``"none"``).
        lm_eval_task_names: lm-evaluation-harness tasks also run at every row (optional, see :func:`lm_eval_tasks`).
        mmlu: an :class:`~gere_hf.evaluation.mmlu.MMLUEvaluator` also run at every row (general knowledge retention).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        general_texts: Sequence[str] | None = None,
        *,
        stage_names: Sequence[str] | None = None,
        label: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 16,
        general_max_length: int = DEFAULT_GENERAL_MAX_LENGTH,
        general_batch_size: int = 8,
        lm_eval_task_names: Sequence[str] | None = None,
        lm_eval_limit: int | float | None = None,
        mmlu=None,
        progress: bool = True,
    ):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("ContinualEvaluator needs at least one task.")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Task names must be unique; {duplicates} occur more than once. Rename the tasks.")
        self.stage_names = list(stage_names) if stage_names is not None else ["base"] + names
        if len(self.stage_names) != len(self.tasks) + 1:
            raise ValueError(
                f"stage_names needs {len(self.tasks) + 1} names (base and one per stage), got {len(self.stage_names)}."
            )
        self.general_texts = [t for t in general_texts if t and t.strip()] if general_texts is not None else None
        if self.general_texts is not None and not self.general_texts:
            raise ValueError("general_texts holds no non-empty text; pass held-out texts or None.")
        self.label = label
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.general_max_length = general_max_length
        self.general_batch_size = general_batch_size
        self.lm_eval_task_names = list(lm_eval_task_names) if lm_eval_task_names else None
        self.lm_eval_limit = lm_eval_limit
        self.mmlu = mmlu
        self.progress = progress
        self._rows: dict[int, dict] = {}

    @property
    def num_stages(self) -> int:
        return len(self.tasks)

    @property
    def matrix(self) -> list[list[float] | None]:
        """``R`` so far: ``T + 1`` rows, ``None`` for rows not evaluated yet."""
        return [
            [self._rows[r]["accuracy"][t.name] for t in self.tasks] if r in self._rows else None
            for r in range(self.num_stages + 1)
        ]

    def evaluate(self, model, tokenizer, row: int) -> dict:
        """Evaluate every task (and the general texts) and store them as row ``row`` (0 = base, t = after stage t).

        Returns ``{"row", "stage", "accuracy": {task: acc}, "correct": {task: "0110…" per example},
        "choice_eos_accuracy": {task: {"with_eos", "without_eos"}}
        (log-likelihood tasks only), "general": {...} or None, "mmlu": ..., "lm_eval": ..., "seconds"}`` (``mmlu`` and
        ``lm_eval`` only when measured). Evaluating a row again overwrites it.
        """
        if isinstance(row, bool) or not isinstance(row, numbers.Integral) or not 0 <= row <= self.num_stages:
            raise ValueError(
                f"row must be 0 (base model) or a stage 1..{self.num_stages} (after training that stage), got {row!r}."
            )
        row = int(row)
        start = time.perf_counter()
        scores = score_tasks(model, tokenizer, self.tasks, self.batch_size, self.max_new_tokens, self.progress)
        accuracy = {name: s.accuracy for name, s in scores.items()}
        general = None
        if self.general_texts is not None:
            general = general_perplexity(
                model, tokenizer, self.general_texts, self.general_max_length, self.general_batch_size, self.progress
            )
        record: dict[str, Any] = {"row": row, "stage": self.stage_names[row], "accuracy": accuracy, "general": general,
                                  # Per eval example, in the task's order, "1" right and "0" wrong: what per-example
                                  # paired tests between runs of one seed read (gere_hf.sweep).
                                  "correct": {name: "".join("1" if c else "0" for c in s.correct)
                                              for name, s in scores.items()}}
        # Both eos variants of the log-likelihood tasks come from the same forwards: recorded to show what the stop
        # token alone does to the accuracy.
        eos_variants = {name: s.eos_variants for name, s in scores.items() if s.eos_variants is not None}
        if eos_variants:
            record["choice_eos_accuracy"] = eos_variants
        if self.mmlu is not None:
            record["mmlu"] = self.mmlu.evaluate(model, tokenizer)
        if self.lm_eval_task_names:
            record["lm_eval"] = lm_eval_tasks(model, tokenizer, self.lm_eval_task_names, self.lm_eval_limit)
        record["seconds"] = time.perf_counter() - start
        self._rows[row] = record
        logger.info(
            "Evaluation after %s: %s%s", self.stage_names[row],
            ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()),
            f", general NLL={general['nll']:.4f}" if general else "",
        )
        if "mmlu" in record:
            m = record["mmlu"]
            logger.info("MMLU (%s, %d-shot) after %s: %.4f ± %.4f over %d questions", m["formulation"], m["shots"],
                        self.stage_names[row], m["accuracy"], m["se"], m["num_questions"])
        return record

    def restore_row(self, record: dict) -> None:
        """Put back a row :meth:`evaluate` returned before (``--resume``: rows measured before an interruption)."""
        row = record.get("row")
        if isinstance(row, bool) or not isinstance(row, numbers.Integral) or not 0 <= row <= self.num_stages:
            raise ValueError(f"The record's row must be 0..{self.num_stages}, got {row!r}.")
        self._rows[int(row)] = record

    def num_stages_evaluated(self) -> int:
        """The largest t such that rows 1..t are all evaluated (the metrics cover these stages)."""
        t = 0
        while t + 1 in self._rows:
            t += 1
        return t

    def _mmlu_rows(self) -> list[dict]:
        base = self._rows.get(0, {}).get("mmlu")
        rows = []
        for r in sorted(self._rows):
            m = self._rows[r].get("mmlu")
            if m is not None:
                delta = None if base is None else m["accuracy"] - base["accuracy"]
                rows.append({"stage": r, "name": self.stage_names[r], **m, "delta_vs_base": delta})
        return rows

    def results(self) -> dict:
        """The JSON-ready results (schema in docs/evaluation.md)."""
        R = self.matrix
        done = self.num_stages_evaluated()
        metrics = None
        if done >= 1:
            sub = [None if R[0] is None else R[0][:done]] + [R[t][:done] for t in range(1, done + 1)]
            metrics = continual_metrics(sub)
        base_general = self._rows.get(0, {}).get("general")
        general = []
        for r in sorted(self._rows):
            g = self._rows[r]["general"]
            if g is None:
                continue
            entry = {"stage": r, "name": self.stage_names[r], **g, "delta_nll_vs_base": None, "ppl_ratio_vs_base": None}
            if base_general is not None:
                entry["delta_nll_vs_base"] = g["nll"] - base_general["nll"]
                entry["ppl_ratio_vs_base"] = math.exp(min(entry["delta_nll_vs_base"], 700.0))
            general.append(entry)
        out: dict[str, Any] = {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "label": self.label,
            "tasks": [t.name for t in self.tasks],
            "task_info": [t.describe() for t in self.tasks],
            "stages": list(self.stage_names),
            "matrix": R,
            "num_stages_evaluated": done,
            "metrics": metrics,
            "general": general,
            "general_texts": None
            if self.general_texts is None
            else {
                "num_texts": len(self.general_texts),
                "fingerprint": texts_fingerprint(self.general_texts),
                "max_length": self.general_max_length,
            },
            "eval_seconds": [{"stage": r, "seconds": self._rows[r]["seconds"]} for r in sorted(self._rows)],
        }
        eos_rows = [r for r in sorted(self._rows) if self._rows[r].get("choice_eos_accuracy")]
        if eos_rows:
            out["choice_eos_accuracy"] = [{"stage": r, "accuracy": self._rows[r]["choice_eos_accuracy"]}
                                          for r in eos_rows]
        if self.mmlu is not None:
            out["mmlu"] = self._mmlu_rows()
            out["mmlu_questions"] = self.mmlu.describe()
        if self.lm_eval_task_names:
            out["lm_eval"] = [{"stage": r, "results": self._rows[r].get("lm_eval")} for r in sorted(self._rows)]
        return out
