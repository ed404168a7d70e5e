"""Every scoring path on prompt-learning PEFT models: prompt tuning, P-tuning and CPT prepend k virtual tokens to every
input, prefix tuning puts k key/value states in front of the cache; each path must give what PEFT's own forward gives
on the text alone.

The reference is always PEFT's forward of one unpadded sequence (``model(input_ids=...)``), its logits with the k
virtual positions dropped, computed here; the paths under test batch, pad (right and left), keep logits at chosen
positions, continue from a KV cache and generate.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import ByT5Tokenizer

from gere_hf.evaluation import choice_logprobs, general_perplexity, generate_answers, tokenize_prompt_completion
from gere_hf.evaluation.mmlu import letter_context, score_cloze, score_letters
from gere_hf.evaluation.scoring import _decode_after, _first_line, prompt_context_ids
from gere_hf.models import tiny_llama, virtual_token_count

METHODS = ["PROMPT_TUNING", "P_TUNING", "CPT", "PREFIX_TUNING"]
VIRTUAL_TOKENS = {"PROMPT_TUNING": 4, "P_TUNING": 4, "CPT": 4, "PREFIX_TUNING": 0}  # positions prepended
PROMPTS = ["Short:", "A much longer prompt that needs padding on the left:", "Mid prompt:", "Q: x?\nA:"]
CHOICES = [[" a", " bbbbbbbb"], [" yes", " no", " maybe"], [" x"], [" one", " two", " three", " four"]]
TEXTS = ["A short text.", "A longer text about the history of science " * 3, "x y", "Mid-length text here."]


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


def _prompt_learning_model(name: str):
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]]
    options = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    if name == "P_TUNING":
        options["encoder_hidden_size"] = 16
    if name == "CPT":  # its prompt is the embeddings of given token ids
        options = {"task_type": "CAUSAL_LM", "cpt_token_ids": [5, 6, 7, 8], "cpt_mask": [1, 1, 1, 1],
                   "cpt_tokens_type_mask": [1, 2, 3, 3]}
    torch.manual_seed(0)  # the virtual tokens' random initialisation
    model = get_peft_model(tiny_llama(seed=3), config_cls(**options)).eval()
    assert virtual_token_count(model) == VIRTUAL_TOKENS[name]
    return model


def _peft_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]`` log-probabilities of PEFT's own forward of ``ids`` alone, the virtual positions dropped."""
    k = virtual_token_count(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert logits.shape[0] == k + len(ids)
    return torch.log_softmax(logits[k:].float(), dim=-1)


@pytest.mark.parametrize("name", METHODS)
def test_general_nll_is_that_of_pefts_forward(tok, name):
    """Before: the hidden states of the k virtual tokens were scored against the text's labels (5.9424 against
    5.9126 on this model)."""
    model = _prompt_learning_model(name)
    result = general_perplexity(model, tok, TEXTS, max_length=40, batch_size=3, progress=False)
    total, count = 0.0, 0
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"][:40]
        logp = _peft_logprobs(model, ids)
        # Every token but the text's first, as for any model: the same tokens as the base model's row. (PEFT's
        # `.loss` also counts the first token, predicted from the virtual tokens.)
        total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        count += len(ids) - 1
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shared_prompt", [True, False])
def test_choice_logprobs_are_those_of_pefts_forward(tok, name, shared_prompt):
    """Both paths: one right-padded forward per candidate (logits kept at the scored positions), and the candidates
    continuing from their prompt's KV cache. Before: off by up to ~0.6 nats, and the cache path prepended the
    virtual tokens a second time."""
    model = _prompt_learning_model(name)
    got = choice_logprobs(model, tok, PROMPTS, CHOICES, batch_size=6, progress=False, shared_prompt=shared_prompt)
    for e, (prompt, candidates) in enumerate(zip(PROMPTS, CHOICES)):
        for c, completion in enumerate(candidates):
            ids, start = tokenize_prompt_completion(tok, prompt, completion)
            logp = _peft_logprobs(model, ids)
            token = [float(logp[t - 1, ids[t]]) for t in range(start, len(ids))]
            assert ids[-1] == tok.eos_token_id
            assert got.completion[e][c] == pytest.approx(sum(token[:-1]), abs=1e-5)
            assert got.eos[e][c] == pytest.approx(token[-1], abs=1e-5)
            assert got.num_tokens[e][c] == len(token) - 1


def _peft_greedy(model, tok, context: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with PEFT's forward over the whole sequence at every step (no cache, no padding)."""
    ids, new = list(context), []
    for _ in range(max_new_tokens):
        token = int(_peft_logprobs(model, ids)[-1].argmax())
        if token == tok.eos_token_id:
            break
        ids.append(token)
        new.append(token)
        if "\n" in tok.decode(new, skip_special_tokens=True):
            break
    return new


@pytest.mark.parametrize("name", METHODS)
def test_generation_is_greedy_decoding_with_pefts_forward(tok, name):
    """Left-padded batches (prefix tuning: one sequence at a time). Before, PEFT's own generate departed from its
    forward after a few tokens, batched or not (prefix tuning: from the first token)."""
    model = _prompt_learning_model(name)
    got = generate_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    for prompt, answer in zip(PROMPTS, got):
        context = prompt_context_ids(tok, prompt)
        assert answer == _first_line(_decode_after(tok, context, _peft_greedy(model, tok, context, 8)))


MMLU_PROMPTS = ["The following are questions.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
                "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:", "Which one?\nA. one\nB. two\nC. three\nD. four\nAnswer:"]


@pytest.mark.parametrize("name", METHODS)
def test_mmlu_letter_scores_are_those_of_pefts_forward(tok, name):
    """The letter form reads the last position of left-padded rows. Before: PEFT ignored the position ids, so the
    padding shifted the text's positions."""
    model = _prompt_learning_model(name)
    scores, _ = score_letters(model, tok, MMLU_PROMPTS, batch_size=3, progress=False)
    for prompt, row in zip(MMLU_PROMPTS, scores):
        context, letters = letter_context(tok, prompt)
        logp = _peft_logprobs(model, context)[-1]
        assert row == pytest.approx([float(logp[t]) for t in letters], abs=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_mmlu_cloze_scores_are_those_of_pefts_forward(tok, name):
    model = _prompt_learning_model(name)
    answers = [["four", "three", "five", "six"], ["x", "yy", "zzz", "wwww"], ["1", "2", "3", "4"]]
    prompts = [f"Question: {q}\nAnswer:" for q in ("What is 2+2?", "Q?", "Which one?")]
    scores = score_cloze(model, tok, prompts, answers, batch_size=2, progress=False)
    for prompt, options, row in zip(prompts, answers, scores):
        expected = []
        for option in options:
            ids, start = tokenize_prompt_completion(tok, prompt, f" {option}")
            assert ids[-1] == tok.eos_token_id  # not scored in the cloze form
            logp = _peft_logprobs(model, ids)
            expected.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids) - 1)))
        assert row == pytest.approx(expected, abs=1e-5)


def test_multitask_prompt_tuning_is_refused_with_the_reason(tok):
    from peft import MultitaskPromptTuningConfig

    model = get_peft_model(tiny_llama(seed=3), MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                            num_tasks=2))
    with pytest.raises(ValueError, match="task id per input"):
        general_perplexity(model, tok, TEXTS, progress=False)
