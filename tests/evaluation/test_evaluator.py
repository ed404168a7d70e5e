"""The evaluator of a continual run: rows, the accuracy matrix, results."""

from __future__ import annotations

import json

import pytest
from eval_utils import YES_NO_PROMPTS, make_task, stop_model, unigram_model
from transformers import ByT5Tokenizer

from gere_hf.evaluation import ContinualEvaluator


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


# ----------------------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------------------


def test_continual_evaluator(tok):
    yes_task = make_task("yes_task", YES_NO_PROMPTS[:3], [" yes"] * 3, [" yes", " no"])
    no_task = make_task("no_task", YES_NO_PROMPTS[:3], [" no"] * 3, [" yes", " no"])
    evaluator = ContinualEvaluator([yes_task, no_task], ["general text one", "another general text"],
                                   label="demo", progress=False)
    yes, no = unigram_model(" yes"), unigram_model(" no")
    record = evaluator.evaluate(yes, tok, 0)
    assert record["accuracy"] == {"yes_task": 1.0, "no_task": 0.0} and record["general"]["nll"] > 0
    assert record["correct"] == {"yes_task": "111", "no_task": "000"}  # per example, for paired tests between runs
    partial = evaluator.results()
    assert partial["matrix"] == [[1.0, 0.0], None, None] and partial["metrics"] is None
    evaluator.evaluate(yes, tok, 1)
    evaluator.evaluate(no, tok, 2)
    results = evaluator.results()
    json.dumps(results)  # JSON-ready
    assert results["tasks"] == ["yes_task", "no_task"] and results["stages"] == ["base", "yes_task", "no_task"]
    assert results["matrix"] == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    m = results["metrics"]
    assert (m["ap"], m["bwt"], m["fwt"], m["mean_forgetting"]) == (0.5, -1.0, 0.0, 1.0)
    general = results["general"]
    assert [g["stage"] for g in general] == [0, 1, 2]
    assert general[0]["delta_nll_vs_base"] == 0.0 and general[1]["delta_nll_vs_base"] == 0.0
    assert general[2]["delta_nll_vs_base"] == pytest.approx(general[2]["nll"] - general[0]["nll"])
    assert results["general_texts"]["num_texts"] == 2 and results["label"] == "demo"
    with pytest.raises(ValueError, match="row must be"):
        evaluator.evaluate(yes, tok, 3)


def test_evaluator_records_scoring_and_both_eos_variants(tok):
    loglik = make_task("loglik_task", YES_NO_PROMPTS[:3], [" no"] * 3, [" yes", " no"])
    no_eos = make_task("no_eos_task", YES_NO_PROMPTS[:3], [" no"] * 3, [" yes", " no"], choice_eos=False)
    generated = make_task("generated", YES_NO_PROMPTS[:3], [" no"] * 3, [" yes", " no"], scoring="generate")
    evaluator = ContinualEvaluator([loglik, no_eos, generated], progress=False)
    record = evaluator.evaluate(stop_model(), tok, 0)
    # The model prefers " yes" but stops only after " no"; it generates " yes!..." (no label: wrong).
    assert record["accuracy"] == {"loglik_task": 1.0, "no_eos_task": 0.0, "generated": 0.0}
    both = {"with_eos": 1.0, "without_eos": 0.0}
    assert record["choice_eos_accuracy"] == {"loglik_task": both, "no_eos_task": both}
    results = json.loads(json.dumps(evaluator.results()))
    assert results["choice_eos_accuracy"] == [{"stage": 0, "accuracy": {"loglik_task": both, "no_eos_task": both}}]
    info = {t["name"]: (t["scoring"], t["choice_eos"]) for t in results["task_info"]}
    assert info == {"loglik_task": ("loglik", True), "no_eos_task": ("loglik", False), "generated": ("generate", None)}
