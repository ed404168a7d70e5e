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


def _direct_nll(model_logits, tok, texts, max_length):
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][:max_length]
            if len(ids) >= 2:
                logp = torch.log_softmax(model_logits(torch.tensor([ids]))[0].float(), -1)
                total -= sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
                count += len(ids) - 1
    return total / count


GENERAL_TEXTS = ["A short text.", "A longer text about the history of science " * 3, "Mid-length text here.", "ok"]


def test_general_perplexity_computes_logits_a_few_positions_at_a_time(tok, monkeypatch):
    from gere_hf.evaluation import retention

    model = tiny_llama(seed=4).eval()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))  # logits
    full = general_perplexity(model, tok, GENERAL_TEXTS, max_length=40, batch_size=3, progress=False)
    assert max(shape[1] for shape in seen) == 39  # a [batch, 39, vocab] slice is 128 MiB of float32 at most
    monkeypatch.setattr(retention, "LOGITS_CHUNK_ELEMENTS", 4 * 384 * 5)  # 5 positions of a batch of 4
    seen.clear()
    chunked = general_perplexity(model, tok, GENERAL_TEXTS, max_length=40, batch_size=4, progress=False)
    # The model's last position and its check against the head, then 39 positions 5 at a time.
    assert max(shape[1] for shape in seen) == 5 and len(seen) == 2 + 8
    assert chunked["nll"] == pytest.approx(full["nll"], rel=1e-6) and chunked["tokens"] == full["tokens"]
    assert chunked["nll"] == pytest.approx(_direct_nll(lambda x: model(input_ids=x).logits, tok, GENERAL_TEXTS, 40),
                                           rel=1e-5)


class _ScaledLogits(torch.nn.Module):
    """A causal LM that scales its logits after the head (as Cohere's logit_scale or Gemma's soft-capping do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        return SimpleNamespace(logits=torch.tanh(out.logits / 2.0) * 2.0)


def test_general_perplexity_of_a_model_that_changes_its_logits_after_the_head(tok):
    model = _ScaledLogits(tiny_llama(seed=4).eval())
    result = general_perplexity(model, tok, GENERAL_TEXTS, max_length=40, batch_size=3, progress=False)
    assert result["nll"] == pytest.approx(_direct_nll(lambda x: model(x).logits, tok, GENERAL_TEXTS, 40), rel=1e-5)


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
