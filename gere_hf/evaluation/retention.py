"""General-capability retention: the NLL of held-out general text, and standard benchmarks through
lm-evaluation-harness.

General texts are tokenized without special tokens, as replay texts are (:func:`general_perplexity`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .utils import (
    eval_mode,
    forward_kwargs,
    head_matches_logits,
    model_device,
    output_head_inputs,
    pad_token_id,
    scoring_forward,
    tokenize_text,
)

logger = logging.getLogger(__name__)

DEFAULT_GENERAL_MAX_LENGTH = 563  # as replay texts (gere_hf.replay.DEFAULT_MAX_LENGTH)
LOGITS_CHUNK_ELEMENTS = 1 << 25
"""Logits computed (and upcast to float32) at once by :func:`general_perplexity`: 32 Mi elements, 128 MiB in float32
(e.g. batch 8 × 32 positions × Llama-3's 128,256 tokens)."""


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
    encoded = [tokenize_text(tokenizer, t, add_special_tokens=False)[:max_length] for t in texts if t and t.strip()]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("No general text gives two tokens or more; pass non-empty held-out texts.")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    with eval_mode(model):
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="general perplexity", disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total_nll += _batch_nll(model, input_ids, mask, labels)
            total_tokens += int((labels != -100).sum())
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean) if mean < 700 else float("inf"), "tokens": total_tokens,
            "num_texts": len(encoded)}


def _chunked_nll(logits_of: Callable[[int, int], torch.Tensor], labels: torch.Tensor, vocab_size: int) -> float:
    """Summed NLL of ``labels`` [B, T-1], the logits of positions [a, b) given by ``logits_of(a, b)``, a few positions
    at a time so that at most ``LOGITS_CHUNK_ELEMENTS`` logits exist in float32."""
    batch, width = labels.shape
    step = max(1, LOGITS_CHUNK_ELEMENTS // max(1, batch * vocab_size))
    total = 0.0
    for a in range(0, width, step):
        b = min(width, a + step)
        chunk = logits_of(a, b).float()
        total += float(F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), labels[:, a:b].reshape(-1),
                                       ignore_index=-100, reduction="sum"))
    return total


def _batch_nll(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed NLL of a batch. Models with an output head (transformers causal LMs) run the head on a few positions at
    a time, from the hidden states that feed it: no [batch, length, vocab] logits exist; others (plain modules) give
    their logits, upcast a few positions at a time."""
    with output_head_inputs(model) as captured:
        out = scoring_forward(model, input_ids, mask, **forward_kwargs(model))
    if captured.hidden is not None:
        if head_matches_logits(captured, out.logits):
            # The text's positions are the last ones: a prompt-learning PEFT model's virtual tokens come first.
            hidden, head = captured.hidden[:, -input_ids.shape[1] :], captured.head
            return _chunked_nll(lambda a, b: head(hidden[:, a:b]), labels, captured.vocab_size)
        logger.info("%s changes its logits after the output head; computing them in full.", type(model).__name__)
        out = scoring_forward(model, input_ids, mask, **forward_kwargs(model))
    logits = out.logits
    return _chunked_nll(lambda a, b: logits[:, a:b], labels, logits.shape[-1])


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A short hash of a list of texts: runs with the same held-out texts compare their general retention."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


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
