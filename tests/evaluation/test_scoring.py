"""Task scoring: log-likelihood ranking of choices and greedy generation with exact match, against models with known
outputs and against brute force."""

from __future__ import annotations

import datasets
import pytest
import torch
from eval_utils import VOCAB, YES_NO_PROMPTS, BigramLM, chain_model, make_task, unigram_model
from transformers import ByT5Tokenizer

from gere_hf.evaluation import (
    evaluate_task,
    evaluate_tasks,
    exact_match,
    generate_answers,
    normalize_answer,
    predict_task,
    score_choices,
    tokenize_prompt_completion,
)
from gere_hf.models import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


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
