"""Metrics of continual runs and their tasks, shipped as Hugging Face ``evaluate`` modules (docs/evaluation.md).

Each module is a folder beside this file holding a script of the same name (what ``evaluate.load`` by path needs):

* ``continual_metrics`` — AP, BWT, FWT and forgetting of an accuracy matrix. The implementation lives in that file
  (it needs nothing from gere_hf, so the folder works anywhere); :func:`continual_metrics` here calls it.
* ``task_accuracy`` — accuracy of task answers as gere_hf's evaluator judges them in its scoring modes (``loglik``,
  ``loglik_norm``, ``generate``); it runs :func:`gere_hf.evaluation.tasks.judge_answers`, what the scorers judge
  with.
* ``mmlu_accuracy`` — MMLU accuracy per subject, category and overall with standard errors; it calls
  :func:`gere_hf.evaluation.mmlu.mmlu_summary`.

``evaluate.load(metric_path(name))`` loads one offline (:func:`load_metric` does it with ``keep_in_memory=True``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

METRIC_MODULES = ("continual_metrics", "task_accuracy", "mmlu_accuracy")
_HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """The folder of a shipped ``evaluate`` module, for ``evaluate.load(metric_path(name))``."""
    if name not in METRIC_MODULES:
        raise ValueError(f"Unknown gere_hf metric {name!r}; the shipped evaluate modules are {', '.join(METRIC_MODULES)}.")
    return os.path.join(_HERE, name)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped module by path: offline, nothing fetched from the Hub. ``keep_in_memory``
    defaults to True (no Arrow cache file); other ``kwargs`` go to ``evaluate.load``."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


def _module(name: str):
    """The module's script, executed once as a private module: the code ``evaluate.load`` runs, without copying it
    into ``HF_MODULES_CACHE`` or sending the inputs through Arrow. Loaded from its file rather than imported as
    ``metrics.<name>.<name>``: that import would set the attribute ``metrics.<name>`` to the folder, hiding the
    function of the same name. Done on first use: the script imports ``evaluate`` (seconds: it imports
    transformers.pipelines)."""
    key = f"{__name__}._{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(metric_path(name), f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def continual_metrics(R: Sequence[Sequence[float] | None]) -> dict:
    """AP, BWT, FWT and forgetting of an accuracy matrix ``R`` (``T + 1`` rows of ``T`` accuracies; row 0, the base
    model, may be ``None``). Computed by the shipped ``continual_metrics`` evaluate module's
    :func:`continual_metrics` (definitions there and in docs/evaluation.md); raises ``ValueError`` on a malformed
    matrix."""
    return _module("continual_metrics").continual_metrics(R)


__all__ = ["METRIC_MODULES", "continual_metrics", "load_metric", "metric_path"]
