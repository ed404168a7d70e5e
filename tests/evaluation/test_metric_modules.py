"""The shipped evaluate modules: loaded offline by path through evaluate.load, their outputs equal to gere_hf's own
functions (continual_metrics, the task judges, mmlu_summary), and continual_metrics computed by the module's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_model
from eval_utils import make_task

import gere_hf.evaluation.metrics as metrics_pkg
from gere_hf.evaluation import continual_metrics, judge_answers
from gere_hf.evaluation.metrics import METRIC_MODULES, metric_path
from gere_hf.evaluation.mmlu import MMLU_SUBJECTS, mmlu_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MATRICES = [
    [[0.2, 0.3, 0.1], [0.9, 0.4, 0.2], [0.7, 0.8, 0.3], [0.6, 0.5, 0.9]],
    [None, [0.9, 0.1], [0.5, 0.8]],
    [[0.25], [0.75]],
    [[0, 0, 0], [0.5, 0, 0], [0.8, 0.7, 0], [0.6, 0.7, 1.0]],
]

# Run in a fresh interpreter: evaluate reads HF_HOME / HF_MODULES_CACHE when it is imported, and offline means no
# network variable is needed besides these.
_OFFLINE_SCRIPT = r"""
import json, sys
import evaluate
from gere_hf.evaluation.metrics import metric_path
spec = json.loads(sys.stdin.read())
out = {"names": {}, "continual": [], "continual_rows": [], "task": [], "mmlu": None}
modules = {n: evaluate.load(metric_path(n), keep_in_memory=True) for n in spec["modules"]}
out["names"] = {n: m.name for n, m in modules.items()}
for R in spec["matrices"]:
    out["continual"].append(modules["continual_metrics"].compute(predictions=R))
    m = evaluate.load(metric_path("continual_metrics"), keep_in_memory=True)
    for row in R:
        m.add(prediction=row)
    out["continual_rows"].append(m.compute())
for case in spec["task"]:
    out["task"].append(modules["task_accuracy"].compute(**case))
out["mmlu"] = modules["mmlu_accuracy"].compute(**spec["mmlu"])
try:
    modules["continual_metrics"].compute(predictions=[[0.1, 0.2], [0.3, 0.4]])
except ValueError as err:
    out["error"] = str(err)
print("RESULT" + json.dumps(out))
"""


def _run_offline(spec: dict, tmp_path) -> dict:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_modules_load_offline_by_path_and_equal_gere_hf(tmp_path):
    """HF_HUB_OFFLINE=1, an empty HF_HOME: every module loads from its folder and computes what gere_hf does."""
    task_cases = [
        {"predictions": [" yes", " no", " yes"], "references": [" yes", " yes", " yes"], "choices": [" yes", " no"]},
        {"predictions": ["The Nile.", "paris", "Rome"], "references": ["nile", "Paris!", "Milan"],
         "scoring": "generate"},
        {"predictions": ["", "b", "A"], "references": [" A", " B", " A"], "scoring": "generate",
         "choices": [" A", " B"]},
    ]
    subjects = sorted(MMLU_SUBJECTS)[:6] * 3
    mmlu = {"predictions": [i % 4 for i in range(18)], "references": [(i * 7) % 4 for i in range(18)],
            "subjects": subjects}
    out = _run_offline({"modules": list(METRIC_MODULES), "matrices": MATRICES, "task": task_cases, "mmlu": mmlu},
                       tmp_path)
    assert out["names"] == {n: n for n in METRIC_MODULES}
    for R, via_compute, via_rows in zip(MATRICES, out["continual"], out["continual_rows"]):
        assert via_compute == continual_metrics(R)
        assert via_rows == continual_metrics(R)
    assert out["task"][0] == {"accuracy": 2 / 3, "se": pytest.approx((2 / 9) ** 0.5 / 3 ** 0.5), "correct": 2,
                              "total": 3}
    assert out["task"][1]["correct"] == 2  # the Nile and Paris match after normalisation, Rome/Milan does not
    assert out["task"][2]["correct"] == 2  # an empty generation is not the label "A" (articles are kept)
    expected = mmlu_summary(subjects, [p == r for p, r in zip(mmlu["predictions"], mmlu["references"])])
    assert out["mmlu"] == json.loads(json.dumps(expected))
    assert "T = 1 stages" in out["error"]  # the module raises continual_metrics' own errors
    # Nothing was fetched: the modules were copied into the temporary HF_HOME's module cache, nothing else.
    cache = tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics"
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(METRIC_MODULES)


def test_continual_metrics_is_the_module_implementation():
    """One implementation: gere_hf's continual_metrics runs the shipped module's function (and stays importable)."""
    module = metrics_pkg._module("continual_metrics")
    assert module.__file__ == os.path.join(metric_path("continual_metrics"), "continual_metrics.py")
    for R in MATRICES:
        assert continual_metrics(R) == module.continual_metrics(R)
    from gere_hf.evaluation.metrics import continual_metrics as again

    assert callable(again) and again is metrics_pkg.continual_metrics  # not hidden by the folder of the same name
    # the module file imports nothing from gere_hf: it works copied anywhere
    with open(module.__file__, encoding="utf-8") as f:
        assert "gere_hf" not in "".join(line for line in f if line.startswith(("import", "from")))


@pytest.mark.parametrize("scoring", ["loglik", "loglik_norm", "generate"])
def test_task_accuracy_module_judges_as_the_evaluator(tokenizer, scoring):
    """In every scoring mode of the evaluator, the module's judgement of the evaluator's own predictions is the
    evaluator's, example by example (closed tasks, and a free-form one for generate)."""
    from gere_hf.evaluation import score_task
    from gere_hf.evaluation.metrics import load_metric

    model = make_tiny_model(seed=3)
    tasks = [make_task("closed", [f"Item {i}:" for i in range(6)], [" yes", " no"] * 3, [" yes", " no"],
                       scoring=scoring)]
    if scoring == "generate":
        tasks.append(make_task("free", [f"Q{i}:" for i in range(4)], [" a", " b", " c", " d"], None))
    acc = load_metric("task_accuracy")
    for task in tasks:
        score = score_task(model, tokenizer, task, progress=False)
        result = acc.compute(predictions=score.predictions, references=score.references, scoring=scoring,
                             choices=task.choices)
        assert result["correct"] == sum(score.correct) and result["accuracy"] == score.accuracy
        assert judge_answers(score.predictions, score.references, scoring, task.choices) == score.correct


def test_task_accuracy_module_refuses_what_the_evaluator_never_computes():
    """Before, the module offered choice / exact_match: exact_match("", " A") counted an empty answer right for the
    label "A" (SQuAD's normalisation drops the article "a"); a closed task scored by generation keeps articles."""
    from gere_hf.evaluation.metrics import load_metric

    acc = load_metric("task_accuracy")
    assert acc.compute(predictions=[""], references=[" A"], scoring="generate", choices=[" A", " B"])["correct"] == 0
    with pytest.raises(ValueError, match="got 'fuzzy'"):
        acc.compute(predictions=["a"], references=["a"], scoring="fuzzy")
    with pytest.raises(ValueError, match=r"now 'generate'"):
        acc.compute(predictions=["a"], references=["a"], scoring="exact_match")
    with pytest.raises(ValueError, match="pass choices="):
        acc.compute(predictions=[" yes"], references=[" yes"], scoring="loglik")
    with pytest.raises(ValueError, match="every prediction is one of the choices"):
        acc.compute(predictions=[" maybe"], references=[" yes"], scoring="loglik", choices=[" yes", " no"])


def test_metric_path_names_the_modules():
    with pytest.raises(ValueError, match="continual_metrics, task_accuracy, mmlu_accuracy"):
        metric_path("accuracy")
    for name in METRIC_MODULES:  # evaluate.load by path needs <folder>/<folder>.py
        assert os.path.isfile(os.path.join(metric_path(name), f"{name}.py"))
