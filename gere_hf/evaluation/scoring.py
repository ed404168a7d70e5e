"""Forgetting evaluation: task accuracy, general-text perplexity and the continual-learning metrics.

Scoring follows common practice (lm-evaluation-harness, the GeRe paper):

* closed tasks (``task.choices`` set): every candidate completion is scored by the model's summed log-likelihood of
  its tokens given the prompt; the argmax is the prediction. Prompt and completion are tokenized exactly as TRL's
  ``SFTTrainer`` tokenizes non-conversational prompt-completion data (see :func:`tokenize_prompt_completion`), so the
  score of the gold completion is minus its completion-only training loss;
* free-form tasks (``task.choices is None``): greedy generation, stopped at a newline or eos, scored by normalised
  exact match (:func:`normalize_answer`);
* general capability: the token-weighted mean NLL (and perplexity) of held-out general texts, tokenized without
  special tokens as replay texts are (:func:`general_perplexity`).

:class:`ContinualEvaluator` evaluates every task after every stage and fills the accuracy matrix ``R``;
:func:`continual_metrics` turns ``R`` into AP, BWT, FWT and forgetting. The definitions are in ``docs/evaluation.md``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import re
import string
import time
import unicodedata
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tasks import Task

logger = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1
DEFAULT_GENERAL_MAX_LENGTH = 563  # as replay texts (gere_hf.replay.DEFAULT_MAX_LENGTH)


# ----------------------------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model) -> dict:
    # No KV cache for single forward passes (transformers models build one in eval mode by default).
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _tokenize(tokenizer, text: str, **kwargs) -> list[int]:
    with warnings.catch_warnings():  # ByT5 warns on every text that already ends with </s>, as TRL's do
        warnings.simplefilter("ignore", UserWarning)
        return list(tokenizer(text=text, **kwargs)["input_ids"])


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
    prompt_ids = _tokenize(tokenizer, prompt)
    ids = _tokenize(tokenizer, prompt + completion)
    return ids, _common_prefix_length(prompt_ids, ids)


def prompt_context_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a trained model sees before its completion: the prompt with leading special tokens (BOS) but without
    special tokens the tokenizer appends to a lone text (e.g. ByT5's ``</s>``), which TRL's sequence does not hold."""
    with_special = _tokenize(tokenizer, prompt)
    plain = _tokenize(tokenizer, prompt, add_special_tokens=False)
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
    device = _device(model)
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **_forward_kwargs(model)
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
    pad_id = _pad_id(tokenizer)
    scores: list[list[float]] = [[] for _ in encoded]
    batches: list[list[int]] = []
    for i in order:
        if batches and sum(len(encoded[j]) for j in batches[-1]) + len(encoded[i]) <= batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    with _eval_mode(model):
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

    device = _device(model)
    pad_id = _pad_id(tokenizer)
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
    device = _device(model)
    ids = list(context)
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), **_forward_kwargs(model)).logits
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
    with _eval_mode(model):
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


# ----------------------------------------------------------------------------------------------------------------------
# General capability
# ----------------------------------------------------------------------------------------------------------------------


def general_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = DEFAULT_GENERAL_MAX_LENGTH,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Token-weighted mean NLL of ``texts`` (each tokenized without special tokens and cut to ``max_length`` tokens,
    as replay texts are) and its perplexity.

    Returns ``{"nll": mean NLL per predicted token, "ppl": exp(nll), "tokens": predicted tokens, "num_texts": n}``;
    every token but a text's first is predicted; padding is masked out; texts of fewer than two tokens are skipped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    encoded = [_tokenize(tokenizer, t, add_special_tokens=False)[:max_length] for t in texts if t and t.strip()]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("No general text gives two tokens or more; pass non-empty held-out texts.")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    total_nll = 0.0
    total_tokens = 0
    with _eval_mode(model):
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="general perplexity", disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask, **_forward_kwargs(model)).logits
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((labels != -100).sum())
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean) if mean < 700 else float("inf"), "tokens": total_tokens,
            "num_texts": len(encoded)}


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a list of texts: runs with the same held-out texts compare their general retention."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Continual-learning metrics
# ----------------------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_metrics(R: Sequence[Sequence[float] | None]) -> dict:
    """AP, BWT, FWT and forgetting of an accuracy matrix.

    ``R`` has ``T + 1`` rows of ``T`` accuracies: row 0 is the base model before any stage (it may be ``None`` when the
    base model was not evaluated), row ``t`` is after stage ``t`` (1..T); column ``j`` (0-based) is task ``j``,
    trained in stage ``j + 1``. So ``R[j + 1][j]`` is task ``j`` just after it was learned and ``R[j][j]`` just before.

    * ``ap``  = mean_j R[T][j]                                  (all T tasks, final model)
    * ``bwt`` = mean_{j=0..T-2} (R[T][j] - R[j+1][j])          (T-1 tasks; None when T = 1)
    * ``fwt`` = mean_{j=1..T-1} (R[j][j] - R[0][j])            (T-1 tasks; None when T = 1 or without row 0)
    * ``forgetting[j]`` = max_{t=j+1..T-1} R[t][j] - R[T][j]   (j = 0..T-2); ``mean_forgetting`` their mean

    In the 1-based notation of the literature (task i trained in stage i, R_{t,i}): BWT = 1/(T-1) Σ_{i<T} R_{T,i} -
    R_{i,i}; FWT = 1/(T-1) Σ_{i>1} R_{i-1,i} - R_{0,i}; f_i = max_{t∈[i,T-1]} R_{t,i} - R_{T,i}.

    Also returned: ``learned`` (R[j+1][j]), ``final`` (R[T]), ``ap_per_stage`` (mean of R[t][:t], the seen tasks,
    for t = 1..T) and ``num_stages`` (T).
    """
    rows = [None if row is None else list(row) for row in R]
    if len(rows) < 2:
        raise ValueError(
            f"The accuracy matrix needs T + 1 >= 2 rows (row 0: base model, row t: after stage t); got {len(rows)}."
        )
    T = len(rows) - 1
    for t, row in enumerate(rows):
        if row is None:
            if t == 0:
                continue
            raise ValueError(f"Row {t} (after stage {t}) of the accuracy matrix is missing; evaluate after every stage.")
        if len(row) != T:
            raise ValueError(
                f"Row {t} of the accuracy matrix has {len(row)} entries but there are T = {T} stages: each row needs "
                f"one accuracy per task (T columns)."
            )
        bad = [x for x in row if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x)]
        if bad:
            raise ValueError(f"Row {t} of the accuracy matrix holds non-numbers {bad}; every entry must be a number.")
    base = rows[0]
    final = rows[T]
    learned = [rows[j + 1][j] for j in range(T)]
    forgetting = [max(rows[t][j] for t in range(j + 1, T)) - final[j] for j in range(T - 1)]
    return {
        "num_stages": T,
        "ap": _mean(final),
        "bwt": _mean([final[j] - rows[j + 1][j] for j in range(T - 1)]),
        "fwt": None if base is None else _mean([rows[j][j] - base[j] for j in range(1, T)]),
        "mean_forgetting": _mean(forgetting),
        "forgetting": forgetting,
        "learned": learned,
        "final": final,
        "ap_per_stage": [_mean(rows[t][:t]) for t in range(1, T + 1)],
    }


# ----------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional)
# ----------------------------------------------------------------------------------------------------------------------


def lm_eval_tasks(
    model, tokenizer, task_names: str | Sequence[str], limit: int | float | None = None, batch_size: int = 8, **kwargs
) -> dict[str, dict[str, float]] | None:
    """Standard benchmarks through lm-evaluation-harness (``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the
    model in memory). Returns ``{task: {metric: value}}``.

    Returns ``None`` and logs why when ``lm_eval`` is not installed (``pip install gere_hf[eval]``) or when it fails,
    typically because a task's data cannot be downloaded offline; it never crashes the run. An unknown task name
    raises ``ValueError``. Extra ``kwargs`` go to ``simple_evaluate`` (e.g. ``num_fewshot``).
    """
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    if not names:
        raise ValueError("lm_eval_tasks needs at least one task name.")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        logger.warning(
            "lm-evaluation-harness is not installed (%s); skipping the lm-eval tasks %s. "
            "Install it with `pip install gere_hf[eval]`.", err, names,
        )
        return None
    task_manager = None
    try:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager()
        known = set(task_manager.all_tasks)
    except Exception as err:  # an lm_eval without a registry we can read: let simple_evaluate judge the names
        logger.info("Could not read lm-eval's task registry (%s); not checking the task names.", err)
        known = None
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"Unknown lm-eval task(s) {unknown}. `lm_eval --tasks list` lists the {len(known)} known tasks."
            )
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        call = {"model": lm, "tasks": names, "limit": limit, **kwargs}
        if task_manager is not None:
            call["task_manager"] = task_manager
        output = lm_eval.simple_evaluate(**call)
    except Exception as err:
        logger.warning(
            "lm-eval could not evaluate %s (%s: %s). Its datasets are downloaded from the Hugging Face Hub; offline, "
            "pre-download them into the datasets cache or drop the lm-eval tasks. Continuing without them.",
            names, type(err).__name__, err,
        )
        return None
    finally:
        model.train(was_training)
    results = (output or {}).get("results", {})
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in results.items()
    }


# ----------------------------------------------------------------------------------------------------------------------
# The evaluator of a continual run
# ----------------------------------------------------------------------------------------------------------------------


class ContinualEvaluator:
    """Evaluates every task (and held-out general text) after every stage of a continual run.

    Call ``evaluate(model, tokenizer, 0)`` on the base model, then ``evaluate(model, tokenizer, t)`` after stage t
    (task ``tasks[t - 1]`` trained); :meth:`results` gives the JSON-ready results for
    :func:`gere_hf.report.write_report`.

    Args:
        tasks: the task sequence, in training order.
        general_texts: held-out general texts (e.g. ``gere_hf.replay.replay_heldout_texts(200, seed)``) whose NLL
            measures general-capability retention; ``None`` skips it.
        stage_names: names of rows 0..T (default ``"base"`` and the task names).
        label: the run's label in comparisons (e.g. ``"gere"``, ``"none"``).
        lm_eval_task_names: lm-evaluation-harness tasks also run at every row (optional, see :func:`lm_eval_tasks`).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        general_texts: Sequence[str] | None = None,
        *,
        stage_names: Sequence[str] | None = None,
        label: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 16,
        general_max_length: int = DEFAULT_GENERAL_MAX_LENGTH,
        general_batch_size: int = 8,
        lm_eval_task_names: Sequence[str] | None = None,
        lm_eval_limit: int | float | None = None,
        progress: bool = True,
    ):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("ContinualEvaluator needs at least one task.")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Task names must be unique; {duplicates} occur more than once. Rename the tasks.")
        self.stage_names = list(stage_names) if stage_names is not None else ["base"] + names
        if len(self.stage_names) != len(self.tasks) + 1:
            raise ValueError(
                f"stage_names needs {len(self.tasks) + 1} names (base and one per stage), got {len(self.stage_names)}."
            )
        self.general_texts = [t for t in general_texts if t and t.strip()] if general_texts is not None else None
        if self.general_texts is not None and not self.general_texts:
            raise ValueError("general_texts holds no non-empty text; pass held-out texts or None.")
        self.label = label
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.general_max_length = general_max_length
        self.general_batch_size = general_batch_size
        self.lm_eval_task_names = list(lm_eval_task_names) if lm_eval_task_names else None
        self.lm_eval_limit = lm_eval_limit
        self.progress = progress
        self._rows: dict[int, dict] = {}

    @property
    def num_stages(self) -> int:
        return len(self.tasks)

    @property
    def matrix(self) -> list[list[float] | None]:
        """``R`` so far: ``T + 1`` rows, ``None`` for rows not evaluated yet."""
        return [
            [self._rows[r]["accuracy"][t.name] for t in self.tasks] if r in self._rows else None
            for r in range(self.num_stages + 1)
        ]

    def evaluate(self, model, tokenizer, row: int) -> dict:
        """Evaluate every task (and the general texts) and store them as row ``row`` (0 = base, t = after stage t).

        Returns ``{"row", "stage", "accuracy": {task: acc}, "general": {...} or None, "lm_eval": ..., "seconds"}``.
        Evaluating a row again overwrites it.
        """
        if isinstance(row, bool) or not isinstance(row, numbers.Integral) or not 0 <= row <= self.num_stages:
            raise ValueError(
                f"row must be 0 (base model) or a stage 1..{self.num_stages} (after training that stage), got {row!r}."
            )
        row = int(row)
        start = time.perf_counter()
        accuracy = evaluate_tasks(model, tokenizer, self.tasks, self.batch_size, self.max_new_tokens, self.progress)
        general = None
        if self.general_texts is not None:
            general = general_perplexity(
                model, tokenizer, self.general_texts, self.general_max_length, self.general_batch_size, self.progress
            )
        record: dict[str, Any] = {"row": row, "stage": self.stage_names[row], "accuracy": accuracy, "general": general}
        if self.lm_eval_task_names:
            record["lm_eval"] = lm_eval_tasks(model, tokenizer, self.lm_eval_task_names, self.lm_eval_limit)
        record["seconds"] = time.perf_counter() - start
        self._rows[row] = record
        logger.info(
            "Evaluation after %s: %s%s", self.stage_names[row],
            ", ".join(f"{k}={v:.3f}" for k, v in accuracy.items()),
            f", general NLL={general['nll']:.4f}" if general else "",
        )
        return record

    def num_stages_evaluated(self) -> int:
        """The largest t such that rows 1..t are all evaluated (the metrics cover these stages)."""
        t = 0
        while t + 1 in self._rows:
            t += 1
        return t

    def results(self) -> dict:
        """The JSON-ready results (schema in docs/evaluation.md)."""
        R = self.matrix
        done = self.num_stages_evaluated()
        metrics = None
        if done >= 1:
            sub = [None if R[0] is None else R[0][:done]] + [R[t][:done] for t in range(1, done + 1)]
            metrics = continual_metrics(sub)
        base_general = self._rows.get(0, {}).get("general")
        general = []
        for r in sorted(self._rows):
            g = self._rows[r]["general"]
            if g is None:
                continue
            entry = {"stage": r, "name": self.stage_names[r], **g, "delta_nll_vs_base": None, "ppl_ratio_vs_base": None}
            if base_general is not None:
                entry["delta_nll_vs_base"] = g["nll"] - base_general["nll"]
                entry["ppl_ratio_vs_base"] = math.exp(min(entry["delta_nll_vs_base"], 700.0))
            general.append(entry)
        out: dict[str, Any] = {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "label": self.label,
            "tasks": [t.name for t in self.tasks],
            "task_info": [t.describe() for t in self.tasks],
            "stages": list(self.stage_names),
            "matrix": R,
            "num_stages_evaluated": done,
            "metrics": metrics,
            "general": general,
            "general_texts": None
            if self.general_texts is None
            else {
                "num_texts": len(self.general_texts),
                "fingerprint": texts_fingerprint(self.general_texts),
                "max_length": self.general_max_length,
            },
            "eval_seconds": [{"stage": r, "seconds": self._rows[r]["seconds"]} for r in sorted(self._rows)],
        }
        if self.lm_eval_task_names:
            out["lm_eval"] = [{"stage": r, "results": self._rows[r].get("lm_eval")} for r in sorted(self._rows)]
        return out
