"""Task scoring: log-likelihood ranking of choices and greedy generation with exact match, against models with known
outputs and against brute force."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch
from eval_utils import VOCAB, YES_NO_PROMPTS, BigramLM, chain_model, make_task, stop_model, unigram_model
from transformers import ByT5Tokenizer

from gere_hf.evaluation import (
    TASK_SCORERS,
    TaskDataError,
    choice_logprobs,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    generate_answers,
    normalize_answer,
    predict_task,
    score_choices,
    score_task,
    tokenize_prompt_completion,
)
from gere_hf.evaluation.scoring import generation_budget
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


# ----------------------------------------------------------------------------------------------------------------------
# Scoring modes and the eos option
# ----------------------------------------------------------------------------------------------------------------------


def _brute_force_parts(table, prompt, completion):
    """(summed log-prob of the completion's bytes, log-prob of TRL's eos, number of bytes) under a bigram table."""
    ids = [b + 3 for b in (prompt + completion).encode()] + [1]
    start = len(prompt.encode())
    logp = torch.log_softmax(table, dim=-1)
    body = sum(float(logp[ids[t - 1], ids[t]]) for t in range(start, len(ids) - 1))
    return body, float(logp[ids[-2], ids[-1]]), len(ids) - 1 - start


def test_eos_on_off_and_per_token_scores_equal_brute_force(tok):
    gen = torch.Generator().manual_seed(5)
    model = BigramLM(torch.randn(VOCAB, VOCAB, generator=gen) * 3)
    prompts = [f"Item {i} {'y' * (i % 4)}:\nLabel:" for i in range(9)]
    choices = [" alpha", " beta", " gamma delta", " b"]
    parts = choice_logprobs(model, tok, prompts, [choices] * len(prompts), batch_size=6, progress=False)
    with_eos = score_choices(model, tok, prompts, [choices] * len(prompts), batch_size=6, progress=False)
    without = score_choices(model, tok, prompts, [choices] * len(prompts), progress=False, choice_eos=False)
    norm = score_choices(model, tok, prompts, [choices] * len(prompts), progress=False, length_normalized=True)
    norm_without = parts.scores(choice_eos=False, length_normalized=True)
    for i, prompt in enumerate(prompts):
        brute = [_brute_force_parts(model.table.detach(), prompt, c) for c in choices]
        assert parts.completion[i] == pytest.approx([b for b, _, _ in brute], rel=1e-5, abs=1e-4)
        assert parts.eos[i] == pytest.approx([e for _, e, _ in brute], rel=1e-5, abs=1e-4)
        assert parts.num_tokens[i] == [n for _, _, n in brute] == [len(c.encode()) for c in choices]
        assert with_eos[i] == pytest.approx([b + e for b, e, _ in brute], rel=1e-5, abs=1e-4)
        assert without[i] == pytest.approx([b for b, _, _ in brute], rel=1e-5, abs=1e-4)
        assert norm[i] == pytest.approx([(b + e) / (n + 1) for b, e, n in brute], rel=1e-5, abs=1e-4)
        assert norm_without[i] == pytest.approx([b / n for b, _, n in brute], rel=1e-5, abs=1e-4)


def test_eos_option_decides_what_a_model_that_does_not_stop_gets(tok):
    model = stop_model()
    gold_no = make_task("no", YES_NO_PROMPTS, [" no"] * 7, [" yes", " no"])
    with_eos = score_task(model, tok, gold_no, progress=False)
    assert with_eos.scoring == "loglik" and with_eos.choice_eos is True
    assert with_eos.accuracy == 1.0 and set(with_eos.predictions) == {" no"}
    without = score_task(model, tok, dataclasses.replace(gold_no, choice_eos=False), progress=False)
    assert without.accuracy == 0.0 and set(without.predictions) == {" yes"}
    # Both variants come from the same forwards, whichever the task uses.
    assert with_eos.eos_variants == without.eos_variants == {"with_eos": 1.0, "without_eos": 0.0}
    assert evaluate_task(model, tok, gold_no, progress=False) == 1.0  # the task's option by default


def test_generate_scores_closed_tasks_by_exact_match_of_the_label(tok):
    # (chain_model's strings use each character once: each character predicts the next.)
    task = make_task("answer", YES_NO_PROMPTS[:3], [" yes"] * 3, [" yes", " no"])
    generate = dataclasses.replace(task, scoring="generate")
    # Normalised (case, punctuation): right; a generation that runs on past the label, or matches no label: wrong.
    right = score_task(chain_model(" Yes!\nmo"), tok, generate, progress=False)
    assert right.accuracy == 1.0 and right.predictions == [" yes"] * 3 and right.eos_variants is None
    assert score_task(chain_model(" yesxz"), tok, generate, progress=False).accuracy == 0.0
    unknown = score_task(chain_model(" maybe\n"), tok, generate, progress=False)
    assert unknown.accuracy == 0.0 and unknown.predictions == ["maybe"] * 3
    # Ranked by log-likelihood instead, the model that runs on still picks the right label.
    assert score_task(chain_model(" yesxz"), tok, task, progress=False).accuracy == 1.0


def test_generate_keeps_articles_of_labels_and_raises_a_short_budget(tok):
    copa = make_task("copa", YES_NO_PROMPTS[:2], [" A", " B"], [" A", " B"])
    generate = dataclasses.replace(copa, scoring="generate")
    assert score_task(chain_model(" A\n"), tok, generate, progress=False).correct == [True, False]
    assert score_task(chain_model("\n"), tok, generate, progress=False).accuracy == 0.0  # "" is no label
    long_label = make_task("long", YES_NO_PROMPTS[:2], [" yeah"] * 2, [" yeah", " no"], scoring="generate")
    assert generation_budget(tok, long_label, 3) == len(" yeah") + 1  # bytes, plus one to see what follows
    assert score_task(chain_model(" yeah\n"), tok, long_label, max_new_tokens=3, progress=False).accuracy == 1.0
    assert score_task(chain_model(" yeahxz"), tok, long_label, max_new_tokens=3, progress=False).accuracy == 0.0


def test_free_form_tasks_generate_and_modes_are_checked():
    free = make_task("free", ["Q:"], [" Paris"], None)
    assert free.scoring == "generate" and free.describe()["choice_eos"] is None
    closed = make_task("closed", ["Q:"], [" a"], [" a", " b"])
    assert closed.describe()["scoring"] == "loglik" and closed.describe()["choice_eos"] is True
    with pytest.raises(TaskDataError, match="free-form .* ranks choices"):
        make_task("free", ["Q:"], [" Paris"], None, scoring="loglik_norm")
    with pytest.raises(TaskDataError, match="unknown scoring 'log_lik'"):
        make_task("closed", ["Q:"], [" a"], [" a", " b"], scoring="log_lik")
    with pytest.raises(TaskDataError, match="'Sci/Tech' and 'SciTech' are the same once normalised"):
        make_task("topic", ["Q:"], ["Sci/Tech"], ["Sci/Tech", "SciTech"], scoring="generate")
    with pytest.raises(TaskDataError, match="empty once normalised"):
        make_task("dots", ["Q:"], ["..."], ["...", "b"], scoring="generate")
    with pytest.raises(TaskDataError, match="choice_eos must be true or false"):
        make_task("closed", ["Q:"], [" a"], [" a", " b"], choice_eos="yes")
    assert list(TASK_SCORERS) == ["loglik", "loglik_norm", "generate"]


# ----------------------------------------------------------------------------------------------------------------------
# Speed: the prompt shared across its candidates, logits only where scored
# ----------------------------------------------------------------------------------------------------------------------


def _forward_shapes(model):
    """Input shapes of the model's forwards and of its LM head (the positions it computes logits for)."""
    calls = {"model": [], "head": []}
    model.register_forward_pre_hook(lambda m, a, kw: calls["model"].append(tuple(kw["input_ids"].shape)),
                                    with_kwargs=True)
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: calls["head"].append(tuple(a[0].shape)))
    return calls


SHARED_PROMPTS = ["Short:", "A much longer prompt that needs padding on the left:", "Mid prompt:", "Q: x?\nA:"]
SHARED_CHOICES = [[" a", " bbbbbbbb"], [" yes", " no", " maybe"], [" x"], [" one", " two", " three", " four"]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_scores_equal_the_plain_path_on_llama(tok, attn):
    model = tiny_llama(seed=6, attn_implementation=attn).eval()
    calls = _forward_shapes(model)
    shared = choice_logprobs(model, tok, SHARED_PROMPTS, SHARED_CHOICES, batch_size=6, progress=False,
                             shared_prompt=True)
    # Two forwards per batch: the prompts (left-padded, one logit row each) and the candidates' own tokens.
    n_seq = sum(len(c) for c in SHARED_CHOICES)
    assert sum(shape[0] for shape in calls["model"][1::2]) == n_seq
    assert sum(shape[0] for shape in calls["model"][0::2]) == len(SHARED_PROMPTS)
    assert all(shape[1] == 1 for shape in calls["head"][0::2])
    longest_candidate = max(len(c.encode()) for cands in SHARED_CHOICES for c in cands)
    assert max(shape[1] for shape in calls["model"][1::2]) == longest_candidate  # + eos - the last token
    calls["model"].clear()
    calls["head"].clear()
    plain = choice_logprobs(model, tok, SHARED_PROMPTS, SHARED_CHOICES, batch_size=6, progress=False,
                            shared_prompt=False)
    for field in ("completion", "eos"):
        for a, b in zip(getattr(shared, field), getattr(plain, field)):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert shared.num_tokens == plain.num_tokens
    # The plain path computes logits only at the positions some sequence of the batch scores.
    widths = [shape[1] for shape in calls["model"]]
    assert all(head[1] < width for head, width in zip(calls["head"], widths))


def test_models_without_a_full_attention_cache_take_the_plain_path(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()  # a sliding-window cache forgets prompt tokens the candidates need
    auto = choice_logprobs(model, tok, SHARED_PROMPTS, SHARED_CHOICES, progress=False)
    plain = choice_logprobs(model, tok, SHARED_PROMPTS, SHARED_CHOICES, progress=False, shared_prompt=False)
    assert auto == plain
    with pytest.raises(ValueError, match="cache, which candidates cannot continue from"):
        choice_logprobs(model, tok, SHARED_PROMPTS, SHARED_CHOICES, progress=False, shared_prompt=True)
    with pytest.raises(ValueError, match="cannot continue candidates"):
        choice_logprobs(unigram_model("a"), tok, ["Q:"], [[" a"]], progress=False, shared_prompt=True)


@pytest.mark.slow
def test_shared_prompt_scores_equal_the_plain_path_on_smollm2(smollm2):
    from gere_hf.evaluation import load_builtin_task

    model, tokenizer = smollm2
    task = load_builtin_task("polarity", 10, 12, seed=0)
    prompts = list(task.eval["prompt"])
    kwargs = {"batch_size": 8, "progress": False}
    shared = choice_logprobs(model, tokenizer, prompts, [task.choices] * 12, shared_prompt=True, **kwargs)
    plain = choice_logprobs(model, tokenizer, prompts, [task.choices] * 12, shared_prompt=False, **kwargs)
    for field in ("completion", "eos"):
        for a, b in zip(getattr(shared, field), getattr(plain, field)):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert shared.num_tokens == plain.num_tokens and all(e is not None for row in shared.eos for e in row)
