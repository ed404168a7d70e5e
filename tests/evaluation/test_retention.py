"""General retention: held-out NLL against a direct computation, and the optional lm-evaluation-harness bridge."""

from __future__ import annotations

import logging
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from eval_utils import unigram_model
from transformers import ByT5Tokenizer

from gere_hf.evaluation import general_perplexity, lm_eval_tasks
from gere_hf.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


# ----------------------------------------------------------------------------------------------------------------------
# General perplexity
# ----------------------------------------------------------------------------------------------------------------------


def test_general_perplexity_equals_direct(tok):
    model = tiny_llama(seed=4)
    texts = ["A short text.", "A longer text about the history of science " * 3, "x", "Mid-length text here."]
    result = general_perplexity(model, tok, texts, max_length=40, batch_size=3, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][:40]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            total += float(model(input_ids=x, labels=x).loss) * (len(ids) - 1)
            count += len(ids) - 1
    assert result["tokens"] == count and result["num_texts"] == 3
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="two tokens"):
        general_perplexity(model, tok, ["", "y"], progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ----------------------------------------------------------------------------------------------------------------------


def test_lm_eval_missing_returns_none(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.retention"):
        assert lm_eval_tasks(unigram_model("a"), None, ["hellaswag"]) is None
    assert "not installed" in caplog.text and "gere_hf[eval]" in caplog.text


def _fake_lm_eval(monkeypatch, simple_evaluate):
    root = types.ModuleType("lm_eval")
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, batch_size: SimpleNamespace(model=pretrained)
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda: SimpleNamespace(all_tasks=["arc_easy", "hellaswag"])
    for name, module in [("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf),
                         ("lm_eval.tasks", tasks)]:
        monkeypatch.setitem(sys.modules, name, module)


def test_lm_eval_registry_offline_and_success(monkeypatch, caplog):
    def offline(**kwargs):
        raise ConnectionError("cannot reach huggingface.co")

    _fake_lm_eval(monkeypatch, offline)
    model = unigram_model("a")
    with pytest.raises(ValueError, match="not_a_task"):
        lm_eval_tasks(model, None, ["arc_easy", "not_a_task"])
    model.train()
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.retention"):
        assert lm_eval_tasks(model, None, "arc_easy", limit=5) is None
    assert "ConnectionError" in caplog.text and "offline" in caplog.text and model.training

    def works(model, tasks, limit, task_manager):
        return {"results": {"arc_easy": {"acc,none": 0.5, "alias": "arc_easy", "acc_stderr,none": 0.1}}}

    _fake_lm_eval(monkeypatch, works)
    assert lm_eval_tasks(model, None, ["arc_easy"]) == {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1}}
