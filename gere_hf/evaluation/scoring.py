"""Task scoring: what a model answers to a task's eval examples, and whether it is right.

A task is scored in one of the modes of :data:`gere_hf.evaluation.tasks.SCORING_MODES` (``Task.scoring``; declared
there with how an answer is judged, here with how the answers are obtained: :data:`TASK_SCORERS`):

* ``loglik`` (closed tasks): every candidate completion is scored by the model's summed log-likelihood of its tokens
  given the prompt; the argmax is the prediction (lm-evaluation-harness's ``acc``). Prompt and completion are
  tokenized exactly as TRL's ``SFTTrainer`` tokenizes non-conversational prompt-completion data (see
  :func:`tokenize_prompt_completion`), so the score of the gold completion is minus its completion-only training
  loss. ``Task.choice_eos`` says whether the end-of-sequence token TRL appends to the completion is part of the
  score;
* ``loglik_norm`` (closed tasks): the same log-likelihood divided by the number of tokens scored (per token);
* ``generate``: greedy generation, cut at the first newline, compared with the label after normalisation; the
  O-LoRA / GeRe paper protocol for closed tasks (:func:`normalize_label`: a generation that matches no label is
  wrong) and the only mode of free-form tasks (:func:`normalize_answer`, SQuAD-style).

Choice scoring shares each prompt across its candidates: one forward of the prompt fills a KV cache, and the
candidates continue from it (:func:`choice_logprobs`), so an example with C candidates costs one prompt forward, not
C; models that cannot continue from a cache take the plain path (one right-padded forward per candidate). Either way
log-probabilities are computed only at the positions scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .tasks import SCORING_MODES, ScoringMode, Task
from .utils import (
    accepts_logits_to_keep,
    argmax,
    cache_argument,
    eval_mode,
    forward_kwargs,
    keeps_prompt_in_cache,
    model_device,
    output_cache,
    pad_token_id,
    scoring_forward,
    token_logprobs,
    tokenize_text,
    virtual_prompt_inputs,
    virtual_prompt_model,
)

logger = logging.getLogger(__name__)


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
# Closed tasks: log-likelihood of each choice
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChoiceLogprobs:
    """The log-likelihood of every candidate completion of every prompt, split so that each scoring variant is a sum
    of its parts (no second forward): ``[example][candidate]``.

    Attributes:
        completion: summed log-probability of the completion's tokens, the end-of-sequence token excluded.
        eos: log-probability of the eos token that ends the completion (TRL's training target), or ``None`` when the
            tokenizer has none or the sequence does not end with it.
        num_tokens: the completion's tokens, the eos token excluded.
    """

    completion: list[list[float]]
    eos: list[list[float | None]]
    num_tokens: list[list[int]]

    def scores(self, choice_eos: bool = True, length_normalized: bool = False) -> list[list[float]]:
        """Per candidate: the summed log-likelihood, with the eos term when ``choice_eos``; divided by the number of
        tokens scored (eos counted when included) when ``length_normalized``."""
        out = []
        for comp_row, eos_row, n_row in zip(self.completion, self.eos, self.num_tokens):
            row = []
            for comp, eos, n in zip(comp_row, eos_row, n_row):
                score, count = comp, n
                if choice_eos and eos is not None:
                    score, count = score + eos, count + 1
                row.append(score / count if length_normalized and count else score)
            out.append(row)
        return out


@dataclass
class _Encoded:
    ids: list[int]
    start: int  # first completion token (at least 1: the first token has no context to be predicted from)
    has_eos: bool  # the sequence ends with the eos token, which belongs to the completion


def _encode_choice(tokenizer, prompt: str, completion: str) -> _Encoded:
    ids, start = tokenize_prompt_completion(tokenizer, prompt, completion)
    start = max(start, 1)  # TRL's shifted loss skips the first token too
    eos_id = tokenizer.eos_token_id
    has_eos = eos_id is not None and len(ids) > start and ids[-1] == eos_id
    return _Encoded(ids, start, has_eos)


def _scored_positions(enc: _Encoded) -> range:
    """Positions whose logits predict the completion's tokens."""
    return range(enc.start - 1, len(enc.ids) - 1)


def _plain_logprobs(model, batch: list[_Encoded], pad_id: int) -> list[torch.Tensor]:
    """Per sequence, the log-probabilities of its completion tokens: one right-padded forward of whole sequences.

    A model that takes ``logits_to_keep`` computes logits only at the positions some sequence scores; the float32
    upcast is of the scored rows only."""
    device = model_device(model)
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        input_ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        attention_mask[i, : len(e.ids)] = 1
    kwargs = dict(forward_kwargs(model))
    kept = sorted({p for e in batch for p in _scored_positions(e)})
    if not kept:
        return [torch.zeros(0) for _ in batch]
    column = {p: k for k, p in enumerate(kept)}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.tensor(kept, dtype=torch.long, device=device)
    else:
        column = {p: p for p in kept}
    logits = scoring_forward(model, input_ids.to(device), attention_mask.to(device), **kwargs).logits
    rows = [i for i, e in enumerate(batch) for _ in _scored_positions(e)]
    cols = [column[p] for e in batch for p in _scored_positions(e)]
    targets = torch.tensor([t for e in batch for t in e.ids[e.start :]], dtype=torch.long)
    flat = token_logprobs(logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)],
                          targets) if rows else torch.zeros(0)
    return list(flat.cpu().split([len(e.ids) - e.start for e in batch]))


def _shares_prompt(cands: list[_Encoded]) -> bool:
    """Whether the candidates share their first ``min(start)`` tokens (not so when a prompt without BOS is empty and
    the candidates' first tokens, which are context only, differ)."""
    s = min(c.start for c in cands)
    return all(c.ids[:s] == cands[0].ids[:s] and len(c.ids) >= s for c in cands)


class _NoSharedPrompt(Exception):
    """The model's forward cannot continue the candidates from a shared prompt's cache."""


def _shared_prompt_logprobs(model, examples: list[list[_Encoded]], pad_id: int, cache_arg: str) -> list[torch.Tensor]:
    """Per candidate (examples flattened), the log-probabilities of its completion tokens: one forward of the prompts,
    left-padded, filling a KV cache; the cache repeated over each example's candidates; one forward of the candidates'
    own tokens, right-padded, continuing from it.

    Example ``e`` shares its first ``S_e`` tokens (its candidates' shortest prompt part). The prompt forward keeps
    the logits of its last position only (they predict token ``S_e``); the candidate forward takes tokens
    ``S_e .. len - 2`` (the last token predicts nothing) at positions ``S_e ..``, its attention mask covering the
    prompt's padding too."""
    device = model_device(model)
    shared = [min(c.start for c in cands) for cands in examples]
    width = max(shared)
    prompt_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for e, (cands, s) in enumerate(zip(examples, shared)):
        prompt_ids[e, width - s :] = torch.tensor(cands[0].ids[:s], dtype=torch.long)
        prompt_mask[e, width - s :] = 1
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = scoring_forward(model, prompt_ids.to(device), prompt_mask.to(device), position_ids=prompt_pos.to(device),
                          use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if cache is None or not callable(getattr(cache, "batch_select_indices", None)) or any(
        getattr(cache, "is_sliding", None) or []
    ):  # a sliding-window cache forgets what the candidate mask still covers
        raise _NoSharedPrompt(type(cache).__name__)
    last = out.logits[:, -1]  # [E, V]

    owner = [e for e, cands in enumerate(examples) for _ in cands]
    flat = [(c, shared[e]) for e, cands in enumerate(examples) for c in cands]
    inputs = [c.ids[s : len(c.ids) - 1] for c, s in flat]
    cand_width = max(len(x) for x in inputs)
    # Token t of a candidate (t >= S) is predicted by the prompt's last logits (t == S) or by candidate column t-S-1.
    first_rows, first_targets, rows, cols, targets = [], [], [], [], []
    for r, ((c, s), e) in enumerate(zip(flat, owner)):
        for t in range(c.start, len(c.ids)):
            if t == s:
                first_rows.append(e)
                first_targets.append(c.ids[t])
            else:
                rows.append(r)
                cols.append(t - s - 1)
                targets.append(c.ids[t])
    first = token_logprobs(last[torch.tensor(first_rows, device=last.device)],
                           torch.tensor(first_targets, dtype=torch.long)) if first_rows else torch.zeros(0)
    rest = torch.zeros(0)
    if cand_width > 0 and rows:
        cand_ids = torch.full((len(flat), cand_width), pad_id, dtype=torch.long)
        cand_mask = torch.zeros((len(flat), cand_width), dtype=torch.long)
        for r, x in enumerate(inputs):
            cand_ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            cand_mask[r, : len(x)] = 1
        index = torch.tensor(owner, dtype=torch.long)
        cache.batch_select_indices(index.to(device))
        positions = torch.tensor([s for _, s in flat], dtype=torch.long)[:, None] + torch.arange(cand_width)[None, :]
        mask = torch.cat([prompt_mask[index], cand_mask], dim=1)
        logits = scoring_forward(model, cand_ids.to(device), mask.to(device), position_ids=positions.to(device),
                                 use_cache=True, logits_to_keep=0, **{cache_arg: cache}).logits
        rest = token_logprobs(logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)],
                              torch.tensor(targets, dtype=torch.long))
    first, rest = first.cpu(), rest.cpu()
    result, i_first, i_rest = [], 0, 0
    for c, s in flat:
        parts = []
        if c.start == s:
            parts.append(first[i_first : i_first + 1])
            i_first += 1
        n_rest = len(c.ids) - max(c.start, s + 1)
        parts.append(rest[i_rest : i_rest + n_rest])
        i_rest += n_rest
        result.append(torch.cat(parts))
    return result


def choice_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring choices",
    shared_prompt: bool | None = None,
) -> ChoiceLogprobs:
    """The log-likelihood of each candidate completion of each prompt, in parts (:class:`ChoiceLogprobs`), from one
    pass over the data whatever variant is wanted.

    ``batch_size`` is the number of candidate sequences per forward; whole examples (all their candidates) go into one
    forward, at least one example per forward; examples are batched longest first. ``shared_prompt``: ``None``
    (default) continues the candidates from one forward of their prompt where the model can (transformers causal LMs
    with a full-attention ``DynamicCache``) and falls back to one forward per candidate otherwise; ``True`` insists
    (``ValueError`` where the model cannot); ``False`` always takes the plain path.
    """
    if len(prompts) != len(choices):
        raise ValueError(f"Got {len(prompts)} prompts but {len(choices)} candidate lists.")
    encoded = [[_encode_choice(tokenizer, p, c) for c in cands] for p, cands in zip(prompts, choices)]
    cache_arg = cache_argument(model) if shared_prompt is not False else None
    if shared_prompt and cache_arg is None:
        raise ValueError(f"{type(model).__name__} cannot continue candidates from a prompt's KV cache (it needs a "
                         "transformers causal LM forward with cache, position_ids and logits_to_keep).")
    order = sorted(range(len(encoded)), key=lambda i: -max((len(e.ids) for e in encoded[i]), default=0))
    pad_id = pad_token_id(tokenizer)
    logprobs: list[list[torch.Tensor]] = [[] for _ in encoded]
    batches: list[list[int]] = []
    for i in order:
        if not encoded[i]:
            continue
        if batches and sum(len(encoded[j]) for j in batches[-1]) + len(encoded[i]) <= batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            out = None
            if cache_arg is not None and all(_shares_prompt(encoded[i]) for i in batch):
                try:
                    out = _shared_prompt_logprobs(model, [encoded[i] for i in batch], pad_id, cache_arg)
                except _NoSharedPrompt as err:
                    if shared_prompt:
                        raise ValueError(f"{type(model).__name__} returned a {err} cache, which candidates cannot "
                                         "continue from (a full-attention DynamicCache is needed).") from None
                    logger.info("%s returned a %s cache; scoring each candidate in a forward of its own.",
                                type(model).__name__, err)
                    cache_arg = None
            if out is None:
                out = _plain_logprobs(model, [e for i in batch for e in encoded[i]], pad_id)
            k = 0
            for i in batch:
                logprobs[i] = out[k : k + len(encoded[i])]
                k += len(encoded[i])
    completion, eos, counts = [], [], []
    for enc_row, lp_row in zip(encoded, logprobs):
        completion.append([float(lp[:-1].sum() if e.has_eos else lp.sum()) for e, lp in zip(enc_row, lp_row)])
        eos.append([float(lp[-1]) if e.has_eos else None for e, lp in zip(enc_row, lp_row)])
        counts.append([len(lp) - int(e.has_eos) for e, lp in zip(enc_row, lp_row)])
    return ChoiceLogprobs(completion, eos, counts)


def score_choices(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring choices",
    *,
    choice_eos: bool = True,
    length_normalized: bool = False,
) -> list[list[float]]:
    """For each prompt, the summed log-likelihood of each of its candidate completions: with the eos token TRL
    appends (``choice_eos``, default) or without it; per token when ``length_normalized``.

    ``batch_size`` is the number of sequences per forward pass (see :func:`choice_logprobs`).
    """
    logprobs = choice_logprobs(model, tokenizer, prompts, choices, batch_size, progress, desc)
    return logprobs.scores(choice_eos=choice_eos, length_normalized=length_normalized)


# ----------------------------------------------------------------------------------------------------------------------
# Greedy generation and exact match
# ----------------------------------------------------------------------------------------------------------------------


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
    prompted = virtual_prompt_model(model)
    if prompted is None:
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    else:
        # A prompt-learning PEFT model: the base model generates from PEFT's virtual-token embeddings followed by the
        # context's (PEFT 0.21's own generate departs from its forward after two new tokens under transformers 5,
        # measured on prompt tuning); positions follow the attention mask, so left padding changes nothing.
        inputs = virtual_prompt_inputs(prompted, input_ids.to(device), attention_mask.to(device))
        model, width = prompted.get_base_model(), 0  # from embeddings alone, generate returns the new tokens only
    out = model.generate(
        **inputs,
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
        logits = scoring_forward(model, x, torch.ones_like(x), **forward_kwargs(model)).logits
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
            # Prefix tuning: PEFT 0.21's generate ignores or misplaces the prefix under transformers 5 (measured: its
            # tokens differ from greedy decoding with its own forward, batched or not), so such a model decodes a
            # sequence at a time with full forwards, as plain modules do.
            if callable(getattr(model, "generate", None)) and not keeps_prompt_in_cache(model):
                new = _generate_hf(model, tokenizer, [contexts[i] for i in batch], max_new_tokens)
            else:
                new = [_generate_loop(model, tokenizer, contexts[i], max_new_tokens) for i in batch]
            for i, tokens in zip(batch, new):
                answers[i] = _first_line(_decode_after(tokenizer, contexts[i], tokens))
    return answers



# ----------------------------------------------------------------------------------------------------------------------
# Tasks: the scoring modes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskScore:
    """What :func:`score_task` measured on a task's eval examples.

    Attributes:
        predictions: the model's answer per example (the best-ranked choice, or the generated text; a generation that
            matches a label after normalisation is reported as that label).
        correct: whether each answer counts as right.
        eos_variants: for the log-likelihood modes, the accuracy with and without the eos term
            (``{"with_eos": a, "without_eos": b}``), both from the same forward passes; ``None`` otherwise.
    """

    task: str
    scoring: str
    choice_eos: bool | None
    predictions: list[str]
    references: list[str]
    correct: list[bool]
    eos_variants: dict[str, float] | None = None

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass(frozen=True)
class TaskScorer:
    """A scoring mode (:class:`~gere_hf.evaluation.tasks.ScoringMode`) with what obtains the answers: an entry of
    :data:`TASK_SCORERS`."""

    mode: ScoringMode
    score: Callable[..., TaskScore]  # (model, tokenizer, task, *, batch_size, max_new_tokens, progress)

    @property
    def name(self) -> str:
        return self.mode.name

    @property
    def description(self) -> str:
        return self.mode.description

    @property
    def needs_choices(self) -> bool:
        return self.mode.needs_choices

    @property
    def uses_choice_eos(self) -> bool:
        return self.mode.uses_choice_eos

    @property
    def judge(self) -> Callable[[str, str, bool], bool]:
        return self.mode.judge


def _loglik_score(model, tokenizer, task: Task, *, batch_size: int, max_new_tokens: int, progress: bool) -> TaskScore:
    """Rank the choices by log-likelihood (per token in a length-normalised mode), with and without the eos term,
    from the same forwards."""
    mode = SCORING_MODES[task.scoring]
    prompts = list(task.eval["prompt"])
    references = list(task.eval["completion"])
    logprobs = choice_logprobs(model, tokenizer, prompts, [task.choices] * len(prompts), batch_size, progress,
                               desc=f"eval {task.name}")
    accuracy, predictions = {}, {}
    for eos in (True, False):
        ranked = [task.choices[argmax(row)] for row in logprobs.scores(eos, mode.length_normalized)]
        predictions[eos] = ranked
        accuracy[eos] = sum(mode.judge(p, r, True) for p, r in zip(ranked, references)) / len(references)
    chosen = predictions[task.choice_eos]
    return TaskScore(task.name, task.scoring, task.choice_eos, chosen, references,
                     [mode.judge(p, r, True) for p, r in zip(chosen, references)],
                     {"with_eos": accuracy[True], "without_eos": accuracy[False]})


def generation_budget(tokenizer, task: Task, max_new_tokens: int) -> int:
    """New tokens a task's answers may take: ``max_new_tokens``, and for a closed task at least one more than its
    longest label, so that what the model writes after the label (a newline, eos, or more words) is seen."""
    if task.choices is None:
        return max_new_tokens
    prompt = task.eval[0]["prompt"]
    context = prompt_context_ids(tokenizer, prompt)
    longest = 0
    for choice in task.choices:  # as a continuation of a prompt (merges across the boundary count), and alone
        ids = prompt_context_ids(tokenizer, prompt + choice)
        longest = max(longest, len(ids) - _common_prefix_length(context, ids),
                      len(tokenize_text(tokenizer, choice, add_special_tokens=False)))
    return max(max_new_tokens, longest + 1)


def _generate_score(model, tokenizer, task: Task, *, batch_size: int, max_new_tokens: int, progress: bool) -> TaskScore:
    """Greedy answers, judged in the task's mode; a closed task's answer that matches a label is reported as it."""
    prompts = list(task.eval["prompt"])
    references = list(task.eval["completion"])
    budget = generation_budget(tokenizer, task, max_new_tokens)
    if budget > max_new_tokens:
        logger.info("Task %s: generating up to %d new tokens (its longest label takes %d).", task.name, budget,
                    budget - 1)
    answers = generate_answers(model, tokenizer, prompts, budget, batch_size, progress, desc=f"eval {task.name}")
    mode = SCORING_MODES[task.scoring]
    closed = task.choices is not None
    correct = [mode.judge(a, r, closed) for a, r in zip(answers, references)]
    if not closed:
        return TaskScore(task.name, task.scoring, None, answers, references, correct)
    key = mode.label_key or (lambda text: text)
    labels = {key(c): c for c in task.choices}
    predictions = [labels.get(key(a), a) for a in answers]
    return TaskScore(task.name, task.scoring, None, predictions, references, correct)


TASK_SCORERS: dict[str, TaskScorer] = {
    name: TaskScorer(mode, _loglik_score if mode.needs_choices else _generate_score)
    for name, mode in SCORING_MODES.items()
}
"""The scoring modes a task can be evaluated in (``Task.scoring``, a recipe stage's ``scoring``), each with its scorer:
a mode that needs choices ranks them by log-likelihood, the others generate."""


def score_task(
    model, tokenizer, task: Task, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> TaskScore:
    """Score ``task.eval`` in the task's mode (``task.scoring``, :data:`TASK_SCORERS`)."""
    scorer = TASK_SCORERS[task.scoring]
    return scorer.score(model, tokenizer, task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        progress=progress)


def predict_task(
    model, tokenizer, task: Task, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> list[str]:
    """The model's answer to every eval example, in the task's scoring mode: the best-scoring choice (ties go to the
    earlier choice) or the greedy generation."""
    return score_task(model, tokenizer, task, batch_size, max_new_tokens, progress).predictions


def evaluate_task(
    model, tokenizer, task: Task, batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> float:
    """Accuracy on ``task.eval`` in the task's scoring mode (``task.scoring``)."""
    return score_task(model, tokenizer, task, batch_size, max_new_tokens, progress).accuracy


def _check_unique_names(tasks: Sequence[Task]) -> None:
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Task names must be unique; {duplicates} occur more than once. Rename the tasks.")


def score_tasks(
    model, tokenizer, tasks: Sequence[Task], batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> dict[str, TaskScore]:
    """``{task.name: TaskScore}`` for each task, in order."""
    _check_unique_names(tasks)
    return {t.name: score_task(model, tokenizer, t, batch_size, max_new_tokens, progress) for t in tasks}


def evaluate_tasks(
    model, tokenizer, tasks: Sequence[Task], batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True
) -> dict[str, float]:
    """``{task.name: accuracy}`` for each task, in order."""
    return {name: s.accuracy for name, s in score_tasks(model, tokenizer, tasks, batch_size, max_new_tokens,
                                                          progress).items()}
