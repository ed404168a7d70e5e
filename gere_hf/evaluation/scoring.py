"""Task scoring: what a model answers to a task's eval examples, and whether it is right.

Scoring follows common practice (lm-evaluation-harness, the GeRe paper):

* closed tasks (``task.choices`` set): every candidate completion is scored by the model's summed log-likelihood of
  its tokens given the prompt; the argmax is the prediction. Prompt and completion are tokenized exactly as TRL's
  ``SFTTrainer`` tokenizes non-conversational prompt-completion data (see :func:`tokenize_prompt_completion`), so the
  score of the gold completion is minus its completion-only training loss;
* free-form tasks (``task.choices is None``): greedy generation, stopped at a newline or eos, scored by normalised
  exact match (:func:`normalize_answer`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tasks import Task
from .utils import eval_mode, forward_kwargs, model_device, pad_token_id, tokenize_text


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of ``prompt + completion`` as TRL's SFTTrainer builds them, and the index where the completion starts.

    TRL 1.x (``SFTTrainer._prepare_dataset``, non-conversational prompt-completion data) appends ``eos_token`` to the
    completion text unless it already ends with it, tokenizes ``prompt`` and ``prompt + completion`` as two plain
    strings with the tokenizer's default special tokens, and starts the completion where the two id sequences first
    differ (``trl.data_utils.common_prefix_length``). Tokens merging across the boundary therefore count as completion,
    and special tokens the tokenizer appends to the prompt alone (ByT5's ``</s>``) are not part of the sequence.
    """
    if add_eos and tokenizer.eos_token is not None and not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    prompt_ids = tokenize_text(tokenizer, prompt)
    ids = tokenize_text(tokenizer, prompt + completion)
    return ids, _common_prefix_length(prompt_ids, ids)


def prompt_context_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a trained model sees before its completion: the prompt with leading special tokens (BOS) but without
    special tokens the tokenizer appends to a lone text (e.g. ByT5's ``</s>``), which TRL's sequence does not hold."""
    with_special = tokenize_text(tokenizer, prompt)
    plain = tokenize_text(tokenizer, prompt, add_special_tokens=False)
    n = len(plain)
    for k in range(len(with_special) - n + 1):
        if with_special[k : k + n] == plain:
            return with_special[: k + n]
    return with_special


# ----------------------------------------------------------------------------------------------------------------------
# Closed tasks: log-likelihood ranking
# ----------------------------------------------------------------------------------------------------------------------


def _sequence_logprobs(model, batch: list[tuple[list[int], int]], pad_id: int) -> list[float]:
    """Summed log-probabilities of ``ids[start:]`` given ``ids[:start]`` for each (ids, start), one right-padded forward."""
    device = model_device(model)
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **forward_kwargs(model)
    ).logits
    scores = []
    for i, (ids, start) in enumerate(batch):
        start = max(start, 1)  # the first token has no context to be predicted from (TRL's shifted loss skips it too)
        if start >= len(ids):
            scores.append(0.0)
            continue
        logp = F.log_softmax(logits[i, start - 1 : len(ids) - 1].float(), dim=-1)
        target = input_ids[i, start : len(ids)].to(logp.device)
        scores.append(float(logp.gather(-1, target[:, None]).sum()))
    return scores


def score_choices(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring choices",
) -> list[list[float]]:
    """For each prompt, the summed log-likelihood of each of its candidate completions (eos included, as TRL trains).

    ``batch_size`` is the number of sequences per forward pass; whole examples (all their candidates) go into one
    forward, at least one example per forward. Examples are batched longest first to waste little padding.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"Got {len(prompts)} prompts but {len(choices)} candidate lists.")
    encoded = [[tokenize_prompt_completion(tokenizer, p, c) for c in cands] for p, cands in zip(prompts, choices)]
    order = sorted(range(len(encoded)), key=lambda i: -max((len(ids) for ids, _ in encoded[i]), default=0))
    pad_id = pad_token_id(tokenizer)
    scores: list[list[float]] = [[] for _ in encoded]
    batches: list[list[int]] = []
    for i in order:
        if batches and sum(len(encoded[j]) for j in batches[-1]) + len(encoded[i]) <= batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            flat = [seq for i in batch for seq in encoded[i]]
            out = _sequence_logprobs(model, flat, pad_id) if flat else []
            k = 0
            for i in batch:
                scores[i] = out[k : k + len(encoded[i])]
                k += len(encoded[i])
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# Free-form tasks: greedy generation and exact match
# ----------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation (any Unicode P* character), the articles a/an/the and
    extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P") and ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _first_line(text: str) -> str:
    return text.lstrip(" \t").split("\n", 1)[0].strip()


def _decode_after(tokenizer, context: list[int], new: list[int]) -> str:
    full = tokenizer.decode(context + new, skip_special_tokens=True)
    head = tokenizer.decode(context, skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)


class _StopAtNewline:
    """Stopping criterion: a row is done once its generated text holds a newline."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], dtype=torch.bool, device=input_ids.device)


def _generate_hf(model, tokenizer, contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class _Stop(_StopAtNewline, StoppingCriteria):
        pass

    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, ctx in enumerate(contexts):  # left padding: generation continues every row at the same column
        input_ids[i, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
        attention_mask[i, width - len(ctx) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([_Stop(tokenizer, width)]),
    )
    new_tokens = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        new_tokens.append(row)
    return new_tokens


def _generate_loop(model, tokenizer, context: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding one token at a time, for plain modules without ``generate``."""
    device = model_device(model)
    ids = list(context)
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), **forward_kwargs(model)).logits
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        new.append(token)
        if "\n" in tokenizer.decode(new, skip_special_tokens=True):
            break
    return new


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to ``prompts``: at most ``max_new_tokens`` tokens, cut at the first newline (leading spaces and
    what follows the newline dropped). Models with ``generate`` decode in left-padded batches of ``batch_size``."""
    contexts = [prompt_context_ids(tokenizer, p) for p in prompts]
    answers: list[str] = [""] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            if callable(getattr(model, "generate", None)):
                new = _generate_hf(model, tokenizer, [contexts[i] for i in batch], max_new_tokens)
            else:
                new = [_generate_loop(model, tokenizer, contexts[i], max_new_tokens) for i in batch]
            for i, tokens in zip(batch, new):
                answers[i] = _first_line(_decode_after(tokenizer, contexts[i], tokens))
    return answers


# ----------------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------------


def predict_task(
    model, tokenizer, task: Task, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> list[str]:
    """The model's answer to every eval example: the best-scoring choice (ties go to the earlier choice) or the
    greedy generation."""
    prompts = list(task.eval["prompt"])
    if task.choices is not None:
        scores = score_choices(
            model, tokenizer, prompts, [task.choices] * len(prompts), batch_size, progress, desc=f"eval {task.name}"
        )
        return [task.choices[max(range(len(s)), key=s.__getitem__)] for s in scores]
    return generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc=f"eval {task.name}")


def evaluate_task(
    model, tokenizer, task: Task, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> float:
    """Accuracy on ``task.eval``: log-likelihood ranking of the choices, or exact match of greedy generations."""
    predictions = predict_task(model, tokenizer, task, batch_size, max_new_tokens, progress)
    references = list(task.eval["completion"])
    if task.choices is not None:
        hits = [p == r for p, r in zip(predictions, references)]
    else:
        hits = [exact_match(p, r) for p, r in zip(predictions, references)]
    return sum(hits) / len(hits)


def evaluate_tasks(
    model, tokenizer, tasks: Sequence[Task], batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> dict[str, float]:
    """``{task.name: accuracy}`` for each task, in order."""
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Task names must be unique; {duplicates} occur more than once. Rename the tasks.")
    return {t.name: evaluate_task(model, tokenizer, t, batch_size, max_new_tokens, progress) for t in tasks}
