# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Loss terms used by GeRe replay (arXiv 2508.04676).

Every function here is a pure tensor function: no module state, no config objects. Inputs of any floating dtype
(fp16/bf16/fp32) are cast to float32 inside, and every loss returns a 0-dim float32 tensor that is differentiable
w.r.t. the *student* tensors (``hidden`` / ``logits``). Reference-side tensors (thresholds, labels, stored hidden
states, teacher log-probs) are treated as constants.

Shapes used throughout: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``V`` vocabulary size, ``K`` number of
stored teacher top-k entries. ``mask`` is ``[B, T]`` (bool or 0/1): a token contributes iff its mask entry is non-zero.
Masked-out positions are excluded with ``torch.where`` (not multiplication) so that garbage stored at padding
positions (inf/NaN in an fp16 store, out-of-range ids) can neither leak NaN into the value nor into the gradient.

See ``docs/losses.md`` for the equations, normalisations and the dynamic ("dy") weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "CE_REDUCTIONS",
    "StepCounts",
    "StepLoss",
    "causal_lm_loss",
    "dynamic_weight",
    "replay_step_loss",
    "feature_imitation_loss",
    "logit_imitation_loss",
    "threshold_labels",
    "threshold_margin_loss",
    "token_nll",
]

# Added to the count of non-zero terms / targets, as in the official GeRe normalisation; it only matters when the
# count is 0, where the numerator is 0 as well, so the result is 0 instead of NaN.
_COUNT_EPS = 1e-8

# Floor for log-tail-masses in the top-k KL. The smallest normal float32: clamping only ever triggers in degenerate
# cases (K == V, or a teacher whose stored top-k mass rounds to >= 1), never for a genuinely small but representable
# tail, so the gradient is not silently cut off for a confident student.
_LOG_TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def _token_mask(mask: torch.Tensor, expected_shape: torch.Size, name: str) -> torch.Tensor:
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"`mask` must have shape {tuple(expected_shape)} to match `{name}`, got {tuple(mask.shape)}.")
    return mask != 0


def threshold_labels(reference_hidden: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    r"""Ternary activation-state labels of reference hidden states, as stored by the GeRe reference store.

    For every element :math:`r` of ``reference_hidden`` with per-dimension thresholds :math:`l, u`:

    .. math::

        y = \begin{cases} -1 & r \le l \\ +1 & r \ge u \ (\text{and } r > l) \\ 0 & l < r < u \end{cases}

    The ``-1`` case is tested first, so it wins when ``lower == upper`` (e.g. a dimension whose standard deviation
    is 0): such an element is never labelled 0.

    Args:
        reference_hidden: ``[..., H]`` hidden states of the reference (base) model, any floating dtype.
        lower: ``[H]`` lower thresholds, broadcast over the leading dimensions.
        upper: ``[H]`` upper thresholds, broadcast over the leading dimensions.

    Returns:
        ``int8`` tensor of the same shape as ``reference_hidden`` with values in ``{-1, 0, 1}``.
    """
    ref = reference_hidden.to(torch.float32)
    lower = lower.to(device=ref.device, dtype=torch.float32)
    upper = upper.to(device=ref.device, dtype=torch.float32)
    labels = torch.zeros(ref.shape, dtype=torch.int8, device=ref.device)
    labels = labels.masked_fill(ref >= upper, 1)
    # Applied last so that it overrides +1 when lower == upper.
    labels = labels.masked_fill(ref <= lower, -1)
    return labels


def threshold_margin_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    mask: torch.Tensor,
    per_sample: bool = False,
) -> torch.Tensor:
    r"""GeRe threshold-based margin (TM) loss.

    Penalises each hidden-state element for leaving the activation interval recorded for the reference model. With
    student hidden state :math:`h`, label :math:`y` (from :func:`threshold_labels`) and thresholds :math:`l, u` of its
    dimension:

    .. math::

        \ell(h) = \begin{cases}
            \mathrm{relu}(h - l) & y = -1 \\
            \mathrm{relu}(h - u) + \mathrm{relu}(l - h) & y = 0 \\
            \mathrm{relu}(u - h) & y = +1
        \end{cases}

    .. math::

        \mathcal{L}_{TM} = \frac{\sum_{b,t,k} m_{b,t}\, \ell_{b,t,k}}{\#\{(b,t,k) : m_{b,t}\, \ell_{b,t,k} \ne 0\} + 10^{-8}}

    i.e. the mean over the *violating* elements only (the official GeRe normalisation; the count is an integer and
    carries no gradient). The loss is exactly 0 when every element lies on its recorded side of the thresholds, in
    particular when ``hidden`` is the reference hidden state that produced ``labels``.

    With ``per_sample=True`` the sums and counts run over each sample's own elements (``b`` fixed) and a ``[B]``
    tensor is returned: the value the official code computes for a micro-batch of that one sample (its runs use
    per-device batch 1), which does not depend on what else shares the micro-batch.

    Args:
        hidden: ``[B, T, H]`` student hidden states (any floating dtype; computed in float32).
        labels: ``[B, T, H]`` integer labels in ``{-1, 0, 1}`` (``int8`` in the store).
        lower: ``[H]`` lower thresholds.
        upper: ``[H]`` upper thresholds.
        mask: ``[B, T]`` bool or 0/1; positions with 0 contribute neither to the sum nor to the count.
        per_sample: return one value per sample instead of one for the batch.

    Returns:
        0-dim float32 tensor, or ``[B]`` with ``per_sample``.
    """
    if labels.shape != hidden.shape:
        raise ValueError(f"`labels` must have the shape of `hidden` {tuple(hidden.shape)}, got {tuple(labels.shape)}.")
    keep = _token_mask(mask, hidden.shape[:-1], "hidden").unsqueeze(-1)
    h = hidden.to(torch.float32)
    lower = lower.to(device=h.device, dtype=torch.float32)
    upper = upper.to(device=h.device, dtype=torch.float32)

    above_lower = F.relu(h - lower)
    below_upper = F.relu(upper - h)
    inside = F.relu(h - upper) + F.relu(lower - h)
    term = torch.where(labels == -1, above_lower, torch.where(labels == 1, below_upper, inside))
    term = torch.where(keep, term, torch.zeros((), dtype=term.dtype, device=term.device))

    dims = (1, 2) if per_sample else None
    num_violations = (term != 0).sum(dim=dims).to(torch.float32)
    return term.sum(dim=dims) / (num_violations + _COUNT_EPS)


def feature_imitation_loss(
    hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    mask: torch.Tensor,
    p: int = 1,
    per_sample: bool = False,
) -> torch.Tensor:
    r"""L1 / L2 feature imitation of stored reference hidden states.

    .. math::

        \mathcal{L}_{L1} = \frac{1}{N H} \sum_{(b,t): m_{b,t} \ne 0} \sum_{k=1}^{H} |h_{b,t,k} - r_{b,t,k}|,
        \qquad
        \mathcal{L}_{L2} = \frac{1}{N H} \sum_{(b,t): m_{b,t} \ne 0} \sum_{k=1}^{H} (h_{b,t,k} - r_{b,t,k})^2

    with :math:`N` the number of masked-in tokens. Returns 0 (not NaN) when :math:`N = 0`. With ``per_sample=True``,
    one such mean per sample (``[B]``).

    Args:
        hidden: ``[B, T, H]`` student hidden states.
        reference_hidden: ``[B, T, H]`` stored reference hidden states (typically fp16; cast to float32).
        mask: ``[B, T]`` bool or 0/1.
        p: 1 for mean absolute error, 2 for mean squared error.
        per_sample: return one value per sample instead of one for the batch.

    Returns:
        0-dim float32 tensor, or ``[B]`` with ``per_sample``.
    """
    if p not in (1, 2):
        raise ValueError(f"`p` must be 1 (L1) or 2 (L2), got {p!r}.")
    if reference_hidden.shape != hidden.shape:
        raise ValueError(
            f"`reference_hidden` must have the shape of `hidden` {tuple(hidden.shape)}, "
            f"got {tuple(reference_hidden.shape)}."
        )
    keep = _token_mask(mask, hidden.shape[:-1], "hidden")
    h = hidden.to(torch.float32)
    # Replace padding rows of the reference by the (detached) student so their difference is exactly 0 and an
    # inf/NaN stored there cannot turn the zero upstream gradient into NaN.
    ref = torch.where(keep.unsqueeze(-1), reference_hidden.to(device=h.device, dtype=torch.float32), h.detach())
    diff = h - ref
    per_element = diff.abs() if p == 1 else diff.square()
    per_element = torch.where(keep.unsqueeze(-1), per_element, torch.zeros((), dtype=h.dtype, device=h.device))
    if per_sample:
        return per_element.sum(dim=(1, 2)) / (keep.sum(dim=1).to(torch.float32) * h.shape[-1]).clamp(min=1.0)
    denom = keep.sum().to(torch.float32) * h.shape[-1]
    return per_element.sum() / denom.clamp(min=1.0)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate in both regimes (Maechler, 2012)."""
    a = a.clamp(max=0.0)
    return torch.where(a < -math.log(2.0), torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def logit_imitation_loss(
    logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    per_sample: bool = False,
) -> torch.Tensor:
    r"""Top-k KL divergence from stored teacher log-probs to the student ("kl" replay term).

    The store keeps, for every replay token, the teacher's top-:math:`K` ids :math:`S` and their log-probabilities
    :math:`\log p_i` with :math:`p = \mathrm{softmax}(z^{teacher} / \tau)`. The student is
    :math:`q = \mathrm{softmax}(z / \tau)`. The vocabulary is coarse-grained into :math:`K + 1` outcomes, the
    :math:`K` stored ids plus one "tail" bucket holding the remaining mass:

    .. math::

        p_{tail} = 1 - \sum_{i \in S} p_i, \qquad q_{tail} = 1 - \sum_{i \in S} q_i

    .. math::

        \mathrm{KL}_{K+1}(p \,\|\, q) = \sum_{i \in S} p_i (\log p_i - \log q_i)
            + p_{tail} (\log p_{tail} - \log q_{tail})

    By the data-processing inequality this is a **lower bound** of the full-vocabulary
    :math:`\mathrm{KL}(p \,\|\, q)`; it is exactly 0 when the student equals the teacher. The loss is the mean of
    :math:`\mathrm{KL}_{K+1}` over masked-in tokens (0 when there are none). There is **no** :math:`\tau^2` factor
    (the official GeRe code has none either); multiply outside if you want the Hinton scaling.

    Numerics: :math:`\log q_{tail}` is a log-sum-exp over the student's non-top-k log-probs (exact, no cancellation
    even when the tail is tiny; costs one extra ``[B, T, V]`` float32 buffer); :math:`\log p_{tail}` is computed from
    the stored log-probs with a stable ``log(1 - exp(.))``. Both log-tails are floored at the log of the smallest
    normal float32, which only matters in degenerate cases (``K == V``).

    Args:
        logits: ``[B, T, V]`` student logits (any floating dtype).
        teacher_topk_logprobs: ``[B, T, K]`` teacher ``log_softmax(z / temperature)`` at ``teacher_topk_ids``, stored
            with the same ``temperature``.
        teacher_topk_ids: ``[B, T, K]`` int64 vocabulary ids, distinct within a token. Values at masked-out positions
            are ignored (they may be out of range).
        mask: ``[B, T]`` bool or 0/1.
        temperature: softmax temperature :math:`\tau > 0` applied to the student logits.
        per_sample: return each sample's mean over its own tokens (``[B]``) instead of one value for the batch.

    Returns:
        0-dim float32 tensor, or ``[B]`` with ``per_sample``.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"`teacher_topk_logprobs` {tuple(teacher_topk_logprobs.shape)} and `teacher_topk_ids` "
            f"{tuple(teacher_topk_ids.shape)} must have the same shape."
        )
    if teacher_topk_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k tensors must be [B, T, K] with [B, T] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(teacher_topk_ids.shape)}."
        )
    keep = _token_mask(mask, logits.shape[:-1], "logits")
    keep_k = keep.unsqueeze(-1)
    device = logits.device

    # Padding positions may hold arbitrary ids/log-probs; make them harmless before gather/scatter.
    ids = torch.where(keep_k, teacher_topk_ids.to(device=device, dtype=torch.long), 0)
    teacher_lp = teacher_topk_logprobs.to(device=device, dtype=torch.float32)
    uniform_lp = -math.log(teacher_lp.shape[-1] + 1)
    teacher_lp = torch.where(keep_k, teacher_lp, uniform_lp)

    student_lp = torch.log_softmax(logits.to(torch.float32) / temperature, dim=-1)
    student_topk_lp = student_lp.gather(-1, ids)
    # A finite fill (not -inf): with K == V every entry is filled, and logsumexp's backward over an all -inf row is
    # NaN; a finite fill keeps it finite instead of relying on scatter discarding the gradient at filled entries.
    tail_only = student_lp.scatter(-1, ids, torch.finfo(torch.float32).min)
    student_log_tail = torch.logsumexp(tail_only, dim=-1).clamp(min=_LOG_TAIL_FLOOR)

    teacher_p = teacher_lp.exp()
    teacher_log_topk_mass = torch.logsumexp(teacher_lp, dim=-1)
    teacher_tail = (-torch.expm1(teacher_log_topk_mass.clamp(max=0.0))).clamp(min=0.0)
    teacher_log_tail = _log1mexp(teacher_log_topk_mass).clamp(min=_LOG_TAIL_FLOOR)

    kl = (teacher_p * (teacher_lp - student_topk_lp)).sum(-1) + teacher_tail * (teacher_log_tail - student_log_tail)
    kl = torch.where(keep, kl, torch.zeros((), dtype=kl.dtype, device=device))
    if per_sample:
        return kl.sum(dim=1) / keep.sum(dim=1).to(torch.float32).clamp(min=1.0)
    return kl.sum() / keep.sum().to(torch.float32).clamp(min=1.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Next-token negative log-likelihood of every position, and which positions are targets.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; the returned ``nll[:, t]`` is that prediction's NLL (float32), 0
    where the target is ``-100`` or past the end, and ``targets[:, t]`` says which positions count. Summing over
    ``t`` gives per-sample sums, over everything a batch sum: the token means of :func:`causal_lm_loss` and of the
    trainer's step-level replay CE are built from these.

    Args:
        logits: ``[B, T, V]`` logits (any floating dtype).
        labels: ``[B, T]`` int64 token ids, ``-100`` for ignored positions (not shifted).

    Returns:
        ``(nll, targets)``: ``[B, T]`` float32 and ``[B, T]`` bool.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"`labels` must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}.")
    labels = labels.to(device=logits.device, dtype=torch.long)
    # Shift the labels (by padding with -100) rather than slicing the logits, so no [B, T-1, V] copy is made.
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    vocab_size = logits.shape[-1]
    nll = F.cross_entropy(
        logits.to(torch.float32).reshape(-1, vocab_size),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    return nll, shift_labels != -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Next-token cross-entropy used for replay samples ("ce" replay term and the task CE).

    .. math::

        \mathcal{L}_{CE} = \frac{-\sum_{b} \sum_{t=1}^{T-1} [y_{b,t} \ne -100] \log \mathrm{softmax}(z_{b,t-1})_{y_{b,t}}}
                               {\#\{(b,t) : t \ge 1,\ y_{b,t} \ne -100\} + 10^{-8}}

    i.e. ``logits[:, :-1]`` predict ``labels[:, 1:]``, positions labelled ``-100`` are ignored, and the sum is divided
    by the number of non-ignored targets of this micro-batch (the official GeRe normalisation). Computed in float32;
    returns 0 when every target is ignored.

    Args:
        logits: ``[B, T, V]`` logits (any floating dtype).
        labels: ``[B, T]`` int64 token ids, ``-100`` for ignored positions (not shifted).

    Returns:
        0-dim float32 tensor.
    """
    nll, targets = token_nll(logits, labels)
    return nll.sum() / (targets.sum().to(torch.float32) + _COUNT_EPS)


def dynamic_weight(ce: torch.Tensor, term: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""The official GeRe dynamic ("dy") weight :math:`w = \mathrm{sg}(CE) / (\mathrm{sg}(term) + \epsilon)`.

    Both inputs are detached (``sg`` = stop-gradient), so ``w * term`` has the *value* of ``ce`` (when ``term`` is
    well above ``eps``) but the *gradient* of ``term`` scaled by ``w``. When ``term`` is exactly 0 (e.g. the TM loss
    while the model still equals the reference), ``w * term`` is 0.

    Args:
        ce: 0-dim cross-entropy value.
        term: 0-dim replay term (tm / kl / l1 / l2).
        eps: added to the denominator.

    Returns:
        Detached 0-dim float32 tensor.
    """
    ce = torch.as_tensor(ce).detach().to(torch.float32)
    term = torch.as_tensor(term).detach().to(device=ce.device, dtype=torch.float32)
    return ce / (term + eps)


# -- the loss of an optimizer step ----------------------------------------------------------------------------------

CE_REDUCTIONS = ("sample_mean", "token_mean")
"""How a CE averages within its kind (task, replay): ``sample_mean``, each sample's token mean, then the mean over
samples (the paper's runs: per-device batch 1 with accumulation); ``token_mean``, the mean over every target token of
the step (TRL's and Trainer's plain SFT step)."""


@dataclass(frozen=True)
class StepCounts:
    """One optimizer step, over all processes and accumulation micro-batches.

    Attributes:
        task_samples, replay_samples: samples of each kind in the step.
        task_targets, replay_targets: their next-token targets (the ``token_mean`` denominators).
    """

    task_samples: int = 0
    replay_samples: int = 0
    task_targets: int = 0
    replay_targets: int = 0

    def share(self, fixed: float | None) -> float:
        """The replay share s of the step: ``fixed``, or the replay samples' share of all samples; 0 without
        replay."""
        if self.replay_samples == 0:
            return 0.0
        if fixed is not None:
            return fixed
        return self.replay_samples / (self.task_samples + self.replay_samples)


@dataclass
class StepLoss:
    """A micro-batch's part of the step loss, and the micro-batch's values to log.

    ``total`` summed over the step's micro-batches on every process, and averaged over processes (as DDP, DeepSpeed
    and FSDP average gradients), is the step loss; the logged values are the micro-batch's own.
    """

    total: torch.Tensor
    task_ce: torch.Tensor
    replay_ce: torch.Tensor | None = None
    replay_term: torch.Tensor | None = None
    replay_weight: torch.Tensor | None = None
    share: float = 0.0
    # The three addends of ``total`` (differentiable; they sum to it): what each part of the loss pulls the weights
    # towards, for diagnostics that take their gradients apart (benchmarks/grad_shares.py).
    parts: dict = field(default_factory=dict)


def _per_sample_means(nll_sums: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's token mean (0 for a sample without targets)."""
    return nll_sums / targets.to(nll_sums.dtype).clamp(min=1)


def replay_step_loss(
    task_nll: torch.Tensor,
    task_targets: torch.Tensor,
    counts: StepCounts,
    replay_nll: torch.Tensor | None = None,
    replay_targets: torch.Tensor | None = None,
    replay_term: torch.Tensor | None = None,
    *,
    share: float | None = None,
    weight: float | None = None,
    weight_cap: float | None = None,
    reduction: str = "sample_mean",
    world_size: int = 1,
) -> StepLoss:
    r"""The step loss of GeRe replay, for one micro-batch (docs/losses.md, "Total loss used by the trainer").

    Inputs are the micro-batch's per-sample values: ``task_nll`` / ``replay_nll`` ``[n]`` summed next-token NLLs
    (differentiable), ``task_targets`` / ``replay_targets`` ``[n]`` their target counts, ``replay_term`` ``[n_r]``
    each replay sample's term (TM, KL, L1, L2; None for vanilla replay). ``counts`` are the whole step's. With
    :math:`CE_i` a sample's token mean, :math:`s` the replay share (``share``, or :math:`n_r/(n_t+n_r)` when None):

    - ``reduction="sample_mean"``: :math:`T = rac{1}{n_t}\sum_i CE_i`, :math:`R = rac{1}{n_r}\sum_j CE_j`;
    - ``reduction="token_mean"``: :math:`T`, :math:`R` the token means over the step's task / replay targets;
    - share None: :math:`(1-s)\,T + s\,(R + rac{1}{n_r}\sum_j w_j\,term_j)`, ``dy``
      :math:`w_j = sg(CE_j)/sg(term_j)`; with ``sample_mean`` this is the mean over all the step's samples of each
      sample's own loss (:math:`CE_i`, or :math:`CE_j + w_j term_j`): the official per-sample loop;
    - a fixed share: :math:`(1-s)\,T + s\,R + rac{1}{n_r}\sum_j w_j\,term_j`, ``dy``
      :math:`w_j = sg((1-s)\,T_{mb} + s\,CE_j)/sg(term_j)` with :math:`T_{mb}` the micro-batch's task CE (the
      official mixed micro-batch at :math:`s = 1/2`).

    ``weight`` None is ``dy`` (at most ``weight_cap`` when given), else a fixed :math:`w`. The returned ``total`` is the micro-batch's part, multiplied by
    ``world_size`` (the processes' gradients are averaged), so that summing it over the step's micro-batches gives
    the step loss whatever their number or split.
    """
    if reduction not in CE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {CE_REDUCTIONS}, got {reduction!r}.")
    s = counts.share(share)
    task_means = _per_sample_means(task_nll, task_targets)
    if reduction == "sample_mean":
        task_part = task_means.sum() / max(counts.task_samples, 1)
        task_ce = task_means.detach().mean() if task_means.numel() else task_nll.detach().sum()
    else:
        task_part = task_nll.sum() / max(counts.task_targets, 1)
        task_ce = task_nll.detach().sum() / task_targets.sum().to(task_nll.dtype).clamp(min=1)
    # A micro-batch without replay samples in a step with some (per-device batch 1, accumulation) adds its task part.
    result = StepLoss(total=(1.0 - s) * task_part * world_size, task_ce=task_ce, share=s)
    result.parts["task"] = result.total
    if replay_nll is None or replay_nll.numel() == 0 or s == 0.0:
        return result
    replay_means = _per_sample_means(replay_nll, replay_targets)
    if reduction == "sample_mean":
        replay_part = replay_means.sum() / max(counts.replay_samples, 1)
        result.replay_ce = replay_means.detach().mean()
    else:
        replay_part = replay_nll.sum() / max(counts.replay_targets, 1)
        result.replay_ce = replay_nll.detach().sum() / replay_targets.sum().to(replay_nll.dtype).clamp(min=1)
    term_part = torch.zeros((), dtype=replay_part.dtype, device=replay_part.device)
    if replay_term is not None:
        if weight is None:  # 'dy': w_j·term_j takes the value of the CE it is weighed against
            target = replay_means if share is None else (1.0 - s) * task_ce + s * replay_means
            w = dynamic_weight(target, replay_term)
            if weight_cap is not None:
                w = w.clamp(max=weight_cap)
        else:
            w = torch.full_like(replay_term, float(weight), dtype=torch.float32)
        term_part = (w * replay_term).sum() / max(counts.replay_samples, 1)
        result.replay_term = replay_term.detach().mean()
        violated = replay_term.detach() > 0  # at a zero term the dy weight is CE/1e-8 and multiplies nothing
        if bool(violated.any()):
            result.replay_weight = w.detach()[violated].mean()
    term_scale = s if share is None else 1.0
    result.parts["replay_ce"] = s * replay_part * world_size
    result.parts["replay_term"] = term_scale * term_part * world_size
    result.total = result.parts["task"] + result.parts["replay_ce"] + result.parts["replay_term"]
    return result
