from __future__ import annotations

import json
import logging
import math
import sys
import types
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import ByT5Tokenizer

from gere_hf.evaluation import (
    ContinualEvaluator,
    continual_metrics,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    general_perplexity,
    generate_answers,
    lm_eval_tasks,
    normalize_answer,
    predict_task,
    score_choices,
    tokenize_prompt_completion,
)
from gere_hf.evaluation.tasks import Task
from gere_hf.models import tiny_llama

VOCAB = 384  # ByT5: id = byte + 3; 0 pad, 1 eos, 2 unk


def byte_id(ch: str) -> int:
    return ch.encode()[0] + 3


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


class BigramLM(torch.nn.Module):
    """A model whose output we control: the logits at a position are ``table[token at that position]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def unigram_model(preferred: str) -> BigramLM:
    """Whatever the context, strongly prefers the characters of ``preferred`` and eos."""
    table = torch.zeros(VOCAB, VOCAB)
    for ch in set(preferred):
        table[:, byte_id(ch)] = 10.0
    table[:, 1] = 10.0
    return BigramLM(table)


def chain_model(chain: str, after: str = ":") -> BigramLM:
    """After ``after`` greedily writes ``chain`` (each character predicts the next)."""
    table = torch.zeros(VOCAB, VOCAB)
    prev = after
    for ch in chain:
        table[byte_id(prev), byte_id(ch)] = 10.0
        prev = ch
    return BigramLM(table)


def make_task(name, prompts, completions, choices):
    ds = datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})
    return Task(name, ds, ds, choices=choices)


YES_NO_PROMPTS = [f"Question {i}: is it so?\nAnswer:" for i in range(7)]


# ----------------------------------------------------------------------------------------------------------------------
# Closed tasks
# ----------------------------------------------------------------------------------------------------------------------


def test_known_answers_accuracy_one_and_zero(tok):
    yes_task = make_task("yes", YES_NO_PROMPTS, [" yes"] * 7, [" yes", " no"])
    no_task = make_task("no", YES_NO_PROMPTS, [" no"] * 7, [" yes", " no"])
    model = unigram_model(" yes")
    assert evaluate_task(model, tok, yes_task, batch_size=4, progress=False) == 1.0
    assert evaluate_task(model, tok, no_task, batch_size=4, progress=False) == 0.0
    assert evaluate_tasks(unigram_model(" no"), tok, [yes_task, no_task], progress=False) == {"yes": 0.0, "no": 1.0}


def test_tokenization_mirrors_trl(tok, tmp_path):
    """The scored sequence is SFTTrainer's training sequence, and the gold score is minus its completion loss."""
    from trl import SFTConfig, SFTTrainer

    prompts = ["Review: good fun\nSentiment:", "Q: x?\nA:"]
    completions = [" positive", " yes"]
    model = tiny_llama(seed=1)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    config = SFTConfig(output_dir=str(tmp_path), report_to=[], max_length=None, bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    for example, prompt, completion in zip(trainer.train_dataset, prompts, completions):
        ids, start = tokenize_prompt_completion(tok, prompt, completion)
        assert example["input_ids"] == ids and ids[-1] == tok.eos_token_id  # TRL appends eos to the completion
        assert start == next(i for i, x in enumerate(example["labels"]) if x != -100)
        [[score]] = score_choices(model, tok, [prompt], [[completion]], progress=False)
        x = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=x, labels=torch.tensor([example["labels"]])).loss
        assert score == pytest.approx(-float(loss) * (len(ids) - start), rel=1e-4)


def _brute_force_bigram(table, prompt, completion):
    ids = [b + 3 for b in (prompt + completion).encode()] + [1]  # ByT5 bytes, then TRL's eos
    start = len(prompt.encode())
    logp = torch.log_softmax(table, dim=-1)
    return sum(float(logp[ids[t - 1], ids[t]]) for t in range(start, len(ids)))


def test_ranking_equals_brute_force(tok):
    gen = torch.Generator().manual_seed(0)
    model = BigramLM(torch.randn(VOCAB, VOCAB, generator=gen) * 3)
    prompts = [f"Item {i} {'x' * (i % 5)}:\nLabel:" for i in range(11)]
    choices = [" alpha", " beta", " gamma delta", " b"]
    completions = [choices[i % 4] for i in range(11)]
    scores = score_choices(model, tok, prompts, [choices] * len(prompts), batch_size=5, progress=False)
    predictions = predict_task(model, tok, make_task("t", prompts, completions, choices), batch_size=5, progress=False)
    for prompt, row, prediction in zip(prompts, scores, predictions):
        brute = [_brute_force_bigram(model.table.detach(), prompt, c) for c in choices]
        assert row == pytest.approx(brute, rel=1e-5, abs=1e-4)
        assert prediction == choices[max(range(len(choices)), key=brute.__getitem__)]


def test_batched_scores_equal_unpadded_llama(tok):
    model = tiny_llama(seed=2)
    model.train()
    prompts = ["Short:", "A much longer prompt that needs padding:", "Mid prompt:"]
    choices = [[" a", " bbbbbbbb"], [" yes", " no", " maybe"], [" x"]]
    batched = score_choices(model, tok, prompts, choices, batch_size=4, progress=False)
    assert model.training  # restored
    model.eval()
    for prompt, cands, row in zip(prompts, choices, batched):
        for c, score in zip(cands, row):
            ids, start = tokenize_prompt_completion(tok, prompt, c)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            direct = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
            assert score == pytest.approx(direct, rel=1e-4, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Free-form tasks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,reference,same",
    [
        ("The Andromeda Galaxy.", "andromeda galaxy", True),
        ("  a   colony ", "A colony", True),
        ("Reese’s Pieces!", "Reeses Pieces", True),
        ("Paris, France", "Paris", False),
        ("1984", "1984.", True),
        ("theatre", "atre", False),  # articles only as whole words
    ],
)
def test_exact_match_normalisation(prediction, reference, same):
    assert exact_match(prediction, reference) is same


def test_normalize_answer():
    assert normalize_answer("An  Apple, the   Pie; a DAY") == "apple pie day"


def test_free_form_known_answers(tok):
    model = chain_model(" Paris\nxyz")
    prompts = ["Question: capital of France?\nAnswer:", "Q: where?\nA:"]
    assert generate_answers(model, tok, prompts, progress=False) == ["Paris", "Paris"]
    right = make_task("r", prompts, [" Paris", " paris."], None)
    wrong = make_task("w", prompts, [" London", " Paris, France"], None)
    assert evaluate_task(model, tok, right, progress=False) == 1.0
    assert evaluate_task(model, tok, wrong, progress=False) == 0.0
    assert generate_answers(model, tok, prompts, max_new_tokens=3, progress=False) == ["Pa", "Pa"]


class NoGenerate(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_batched_generate_equals_one_by_one(tok):
    model = tiny_llama(seed=3)
    prompts = ["Q: a?\nA:", "Question: a much longer one, padded on the left?\nAnswer:", "Q: mid size?\nA:"]
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    looped = generate_answers(NoGenerate(model), tok, prompts, max_new_tokens=6, progress=False)
    assert batched == looped


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
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_continual_metrics_three_stages():
    R = [
        [0.2, 0.3, 0.1],  # base
        [0.9, 0.4, 0.2],  # after stage 1 (task 0)
        [0.7, 0.8, 0.3],  # after stage 2 (task 1)
        [0.6, 0.5, 0.9],  # after stage 3 (task 2)
    ]
    m = continual_metrics(R)
    assert m["num_stages"] == 3
    assert m["ap"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.4 - 0.3) + (0.3 - 0.1)) / 2)
    assert m["forgetting"] == pytest.approx([0.9 - 0.6, 0.8 - 0.5])
    assert m["mean_forgetting"] == pytest.approx(0.3)
    assert m["learned"] == [0.9, 0.8, 0.9]
    assert m["ap_per_stage"] == pytest.approx([0.9, 0.75, (0.6 + 0.5 + 0.9) / 3])
    # forgetting takes the best earlier accuracy, not the one just after learning
    assert continual_metrics([[0, 0], [0.5, 0], [0.4, 0.7]])["forgetting"] == pytest.approx([0.1])
    assert continual_metrics([[0, 0, 0], [0.5, 0, 0], [0.8, 0.7, 0], [0.6, 0.7, 1.0]])["forgetting"] == (
        pytest.approx([0.2, 0.0]))


def test_continual_metrics_one_stage_and_no_base():
    m = continual_metrics([[0.25], [0.75]])
    assert m["ap"] == 0.75 and m["bwt"] is None and m["fwt"] is None and m["mean_forgetting"] is None
    assert m["forgetting"] == []
    m = continual_metrics([None, [0.9, 0.1], [0.5, 0.8]])
    assert m["fwt"] is None and m["bwt"] == pytest.approx(-0.4)


@pytest.mark.parametrize(
    "R,match",
    [([[0.5]], "T \\+ 1 >= 2 rows"), ([[0.1, 0.2], [0.3]], "T = 1 stages"), ([[0.1], None], "Row 1"),
     ([[0.1], ["a"]], "non-numbers")],
)
def test_continual_metrics_errors(R, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(R)


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


# ----------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ----------------------------------------------------------------------------------------------------------------------


def test_lm_eval_missing_returns_none(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.scoring"):
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
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.scoring"):
        assert lm_eval_tasks(model, None, "arc_easy", limit=5) is None
    assert "ConnectionError" in caplog.text and "offline" in caplog.text and model.training

    def works(model, tasks, limit, task_manager):
        return {"results": {"arc_easy": {"acc,none": 0.5, "alias": "arc_easy", "acc_stderr,none": 0.1}}}

    _fake_lm_eval(monkeypatch, works)
    assert lm_eval_tasks(model, None, ["arc_easy"]) == {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1}}
