# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Tests for gere_hf.losses against independent, deliberately naive float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from gere_hf.losses import (
    causal_lm_loss,
    dynamic_weight,
    feature_imitation_loss,
    logit_imitation_loss,
    threshold_labels,
    threshold_margin_loss,
)

B, T, H, V, K = 2, 5, 6, 11, 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Naive references: python loops over elements / tokens, float64, written from the equations in docs/losses.md.
# ----------------------------------------------------------------------------------------------------------------------


def ref_labels(ref, lower, upper):
    out = torch.zeros(ref.shape, dtype=torch.int8)
    flat_ref, flat_out = ref.reshape(-1, ref.shape[-1]), out.view(-1, ref.shape[-1])
    for row in range(flat_ref.shape[0]):
        for k in range(flat_ref.shape[1]):
            v = float(flat_ref[row, k])
            if v <= float(lower[k]):
                flat_out[row, k] = -1
            elif v >= float(upper[k]):
                flat_out[row, k] = 1
    return out


def _pos(v):
    # relu with derivative 0 at 0 (a hidden state exactly on its threshold is not a violation)
    return v if v > 0 else v * 0


def ref_tm(hidden, labels, lower, upper, mask):
    """Autograd-capable float64 loop reference (returns a tensor so gradients can be compared)."""
    h = hidden.double()
    terms = []
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            if not bool(mask[b, t]):
                continue
            for k in range(h.shape[2]):
                lo, up, x, y = float(lower[k]), float(upper[k]), h[b, t, k], int(labels[b, t, k])
                if y == -1:
                    terms.append(_pos(x - lo))
                elif y == 1:
                    terms.append(_pos(up - x))
                else:
                    terms.append(_pos(x - up) + _pos(lo - x))
    if not terms:
        return h.sum() * 0
    stacked = torch.stack(terms)
    return stacked.sum() / (int((stacked != 0).sum()) + 1e-8)


def ref_feature(hidden, reference, mask, p):
    h, r = hidden.double(), reference.double()
    total, n_tok = h.sum() * 0, 0
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            if bool(mask[b, t]):
                n_tok += 1
                for k in range(h.shape[2]):
                    total = total + abs(h[b, t, k] - r[b, t, k]) ** p
    return total / (n_tok * h.shape[2]) if n_tok else total


def ref_topk_kl(logits, teacher_lp, teacher_ids, mask, temperature):
    z = logits.double() / temperature
    total, n_tok = z.sum() * 0, 0
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if not bool(mask[b, t]):
                continue
            n_tok += 1
            q = torch.exp(z[b, t]) / torch.exp(z[b, t]).sum()
            kl, p_top = 0.0, 0.0
            top_ids = [int(i) for i in teacher_ids[b, t]]
            for j, i in enumerate(top_ids):
                p_i = math.exp(float(teacher_lp[b, t, j]))
                kl = kl + p_i * (math.log(p_i) - torch.log(q[i]))
                p_top = p_top + p_i
            p_tail = 1.0 - p_top
            # Sum the student's tail explicitly: 1 - sum(q_topk) loses a tiny tail even in float64.
            q_tail = sum(q[i] for i in range(q.shape[0]) if i not in top_ids)
            if p_tail > 0:
                kl = kl + p_tail * (math.log(p_tail) - torch.log(q_tail))
            total = total + kl
    return total / n_tok if n_tok else total


def full_kl(teacher_logits, student_logits, temperature):
    """Per-token full-vocabulary KL(p || q), shape [B, T]."""
    lp = torch.log_softmax(teacher_logits.double() / temperature, -1)
    lq = torch.log_softmax(student_logits.double() / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ref_ce(logits, labels):
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = logits[b, t - 1].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            n += 1
    return total / (n + 1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


def _thresholds():
    g = _gen(1)
    lower = torch.randn(H, generator=g) * 0.3 - 0.4
    upper = lower + torch.rand(H, generator=g) + 0.2
    upper[2] = lower[2]  # std-0 dimension: lower == upper
    return lower, upper


def _hidden_with_ties(seed, lower, upper):
    g = _gen(seed)
    x = torch.randn(B, T, H, generator=g)
    x[0, 0] = lower  # exactly on the lower thresholds (incl. the lower == upper dim)
    x[0, 1] = upper  # exactly on the upper thresholds
    x[1, 2, :3] = lower[:3]
    x[1, 3, 3:] = upper[3:]
    return x


def _mask(seed=2):
    m = torch.rand(B, T, generator=_gen(seed)) > 0.3
    m[0, 0] = m[0, 1] = m[1, 2] = m[1, 3] = True  # keep the tie rows in
    m[1, 4] = False
    return m


def _teacher_topk(teacher_logits, k, temperature):
    lp = torch.log_softmax(teacher_logits.float() / temperature, -1)
    vals, ids = lp.topk(k, dim=-1)
    return vals, ids


# ----------------------------------------------------------------------------------------------------------------------
# threshold_labels
# ----------------------------------------------------------------------------------------------------------------------


def test_threshold_labels_matches_loop_and_tie_rules():
    lower, upper = _thresholds()
    ref = _hidden_with_ties(3, lower, upper)
    labels = threshold_labels(ref, lower, upper)
    assert labels.dtype == torch.int8 and labels.shape == ref.shape
    assert torch.equal(labels, ref_labels(ref, lower, upper))
    assert torch.all(labels[0, 0] == -1)  # value == lower -> -1
    assert torch.all(labels[0, 1, [0, 1, 3, 4, 5]] == 1)  # value == upper -> +1
    assert labels[0, 1, 2] == -1  # lower == upper: -1 wins
    assert not torch.any(labels[..., 2] == 0)  # a std-0 dim is never labelled 0
    assert set(labels.unique().tolist()) == {-1, 0, 1}


def test_threshold_labels_half_input_compares_in_fp32():
    lower, upper = torch.tensor([0.1]), torch.tensor([0.2])
    ref = torch.tensor([[0.1]], dtype=torch.float16)  # fp16(0.1) > fp32(0.1)
    expected = ref_labels(ref.float(), lower, upper)
    assert torch.equal(threshold_labels(ref, lower, upper), expected)


# ----------------------------------------------------------------------------------------------------------------------
# threshold_margin_loss
# ----------------------------------------------------------------------------------------------------------------------


def test_tm_matches_reference_value_and_gradient():
    lower, upper = _thresholds()
    labels = threshold_labels(_hidden_with_ties(3, lower, upper), lower, upper)
    mask = _mask()
    hidden = _hidden_with_ties(4, lower, upper).requires_grad_(True)
    hidden_ref = hidden.detach().double().requires_grad_(True)

    out = threshold_margin_loss(hidden, labels, lower, upper, mask)
    expected = ref_tm(hidden_ref, labels, lower, upper, mask)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() > 0
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    out.backward()
    expected.backward()
    assert torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(hidden.grad.double(), hidden_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(hidden.grad[~mask] == 0)


def test_tm_zero_at_reference_and_at_thresholds():
    lower, upper = _thresholds()
    ref = _hidden_with_ties(5, lower, upper)
    labels = threshold_labels(ref, lower, upper)
    hidden = ref.clone().requires_grad_(True)
    out = threshold_margin_loss(hidden, labels, lower, upper, torch.ones(B, T, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.all(hidden.grad == 0)


def test_tm_masked_positions_do_not_contribute():
    lower, upper = _thresholds()
    labels = threshold_labels(_hidden_with_ties(3, lower, upper), lower, upper)
    mask = _mask()
    hidden = _hidden_with_ties(4, lower, upper)
    base = threshold_margin_loss(hidden, labels, lower, upper, mask)
    perturbed = hidden.clone()
    perturbed[~mask] = 1e4 * torch.randn_like(perturbed[~mask])
    assert torch.equal(threshold_margin_loss(perturbed, labels, lower, upper, mask), base)
    # 0/1 integer masks behave like bool masks
    assert torch.equal(threshold_margin_loss(hidden, labels, lower, upper, mask.long()), base)


def test_tm_normalises_by_number_of_violations():
    lower, upper = torch.zeros(3), torch.ones(3)
    labels = torch.tensor([[[-1, 0, 1]]], dtype=torch.int8)
    hidden = torch.tensor([[[0.5, 0.5, 0.5]]])  # only the -1 and +1 elements violate, by 0.5 each
    out = threshold_margin_loss(hidden, labels, lower, upper, torch.ones(1, 1))
    assert out.item() == pytest.approx(0.5, rel=1e-6)


def test_tm_half_inputs_give_fp32_close_to_fp32():
    lower, upper = _thresholds()
    labels = threshold_labels(_hidden_with_ties(3, lower, upper), lower, upper)
    mask = _mask()
    hidden = _hidden_with_ties(4, lower, upper)
    for dtype in (torch.float16, torch.bfloat16):
        low = hidden.to(dtype)
        out = threshold_margin_loss(low, labels, lower, upper, mask)
        assert out.dtype == torch.float32
        expected = ref_tm(low.float(), labels, lower, upper, mask)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
        # Closeness to the fp32 value only holds without exact ties: rounding an on-threshold value can turn it
        # into a (tiny) violation, which changes the violation count in the denominator by one.
        no_ties = torch.randn(B, T, H, generator=_gen(40))
        torch.testing.assert_close(
            threshold_margin_loss(no_ties.to(dtype), labels, lower, upper, mask),
            threshold_margin_loss(no_ties, labels, lower, upper, mask),
            rtol=0.01,
            atol=1e-3,
        )
        h = low.clone().requires_grad_(True)
        threshold_margin_loss(h, labels, lower, upper, mask).backward()
        assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()


def test_tm_empty_mask_is_zero():
    lower, upper = _thresholds()
    hidden = torch.randn(B, T, H, generator=_gen(9)).requires_grad_(True)
    labels = -torch.ones(B, T, H, dtype=torch.int8)
    out = threshold_margin_loss(hidden, labels, lower, upper, torch.zeros(B, T, dtype=torch.bool))
    assert out.item() == 0.0 and out.dtype == torch.float32
    out.backward()
    assert torch.all(hidden.grad == 0)


# ----------------------------------------------------------------------------------------------------------------------
# feature_imitation_loss
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_feature_matches_reference_and_gradient(p):
    g = _gen(10)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    reference = torch.randn(B, T, H, generator=g).half()
    mask = _mask()
    hidden_ref = hidden.detach().double().requires_grad_(True)

    out = feature_imitation_loss(hidden, reference, mask, p=p)
    expected = ref_feature(hidden_ref, reference, mask, p)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    out.backward()
    expected.backward()
    torch.testing.assert_close(hidden.grad.double(), hidden_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(hidden.grad[~mask] == 0)


@pytest.mark.parametrize("p", [1, 2])
def test_feature_zero_at_equality_and_masked_garbage_ignored(p):
    g = _gen(11)
    reference = torch.randn(B, T, H, generator=g).half()
    mask = _mask()
    hidden = reference.float().clone().requires_grad_(True)
    assert feature_imitation_loss(hidden, reference, mask, p=p).item() == 0.0

    garbage = reference.clone()
    garbage[~mask] = float("inf")
    garbage[1, 4, 0] = float("nan")
    out = feature_imitation_loss(hidden, garbage, mask, p=p)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_feature_half_inputs_give_fp32(dtype):
    g = _gen(12)
    hidden = torch.randn(B, T, H, generator=g)
    reference = torch.randn(B, T, H, generator=g)
    mask = _mask()
    for p in (1, 2):
        out = feature_imitation_loss(hidden.to(dtype), reference.to(dtype), mask, p=p)
        assert out.dtype == torch.float32
        expected = ref_feature(hidden.to(dtype).float(), reference.to(dtype).float(), mask, p)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out, feature_imitation_loss(hidden, reference, mask, p=p), rtol=0.02, atol=0.01)


def test_feature_empty_mask_and_bad_p():
    hidden = torch.randn(B, T, H, generator=_gen(13)).requires_grad_(True)
    reference = torch.randn(B, T, H, generator=_gen(14))
    for p in (1, 2):
        out = feature_imitation_loss(hidden, reference, torch.zeros(B, T), p=p)
        assert out.item() == 0.0 and not torch.isnan(out)
        out.backward()
        assert torch.isfinite(hidden.grad).all()
    for bad in (0, 3, 1.5, "l1"):
        with pytest.raises(ValueError):
            feature_imitation_loss(hidden, reference, torch.ones(B, T), p=bad)


# ----------------------------------------------------------------------------------------------------------------------
# logit_imitation_loss
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_reference_value_and_gradient(temperature):
    g = _gen(20)
    teacher = torch.randn(B, T, V, generator=g) * 2
    student = (teacher + torch.randn(B, T, V, generator=g)).requires_grad_(True)
    lp, ids = _teacher_topk(teacher, K, temperature)
    mask = _mask()
    student_ref = student.detach().double().requires_grad_(True)

    out = logit_imitation_loss(student, lp, ids, mask, temperature=temperature)
    expected = ref_topk_kl(student_ref, lp, ids, mask, temperature)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() > 0
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)

    out.backward()
    expected.backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad.double(), student_ref.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(student.grad[~mask] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_kl_zero_when_student_is_teacher(temperature):
    teacher = torch.randn(B, T, V, generator=_gen(21)) * 3
    lp, ids = _teacher_topk(teacher, K, temperature)
    student = teacher.clone().requires_grad_(True)
    out = logit_imitation_loss(student, lp, ids, torch.ones(B, T, dtype=torch.bool), temperature=temperature)
    assert abs(out.item()) < 1e-6
    out.backward()
    assert student.grad.abs().max().item() < 1e-5


def test_kl_is_a_lower_bound_of_full_kl():
    g = _gen(22)
    for trial in range(5):
        teacher = torch.randn(B, T, V, generator=g) * (1 + trial)
        student = torch.randn(B, T, V, generator=g) * (1 + trial)
        temperature = 0.5 + 0.5 * trial
        for k in (1, K, V - 1):
            lp, ids = _teacher_topk(teacher, k, temperature)
            full = full_kl(teacher, student, temperature)
            for b in range(B):
                for t in range(T):
                    one = torch.zeros(B, T, dtype=torch.bool)
                    one[b, t] = True
                    topk = logit_imitation_loss(student, lp, ids, one, temperature=temperature)
                    assert 0 < topk.item() <= full[b, t].item() + 1e-5


def test_kl_full_vocab_topk_equals_full_kl():
    # K == V: the tail bucket is empty on both sides, so the K+1 KL is the full KL (and must not be NaN).
    g = _gen(23)
    teacher, student = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g).requires_grad_(True)
    lp, ids = _teacher_topk(teacher, V, 1.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    out = logit_imitation_loss(student, lp, ids, mask)
    torch.testing.assert_close(out.double(), full_kl(teacher, student.detach(), 1.0).mean(), rtol=1e-4, atol=1e-6)
    out.backward()
    assert torch.isfinite(student.grad).all()


def test_kl_tiny_student_tail_is_accurate():
    # The student puts ~e^-40 on the tail; computing 1 - sum(q_topk) in fp32 would round to 0.
    teacher = torch.zeros(1, 1, V)
    teacher[..., :K] = 5.0
    student = torch.full((1, 1, V), -40.0)
    student[..., :K] = 0.0
    lp, ids = _teacher_topk(teacher, K, 1.0)
    out = logit_imitation_loss(student, lp, ids, torch.ones(1, 1))
    expected = ref_topk_kl(student.double(), lp.double(), ids, torch.ones(1, 1), 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)


def test_kl_masked_positions_do_not_contribute():
    g = _gen(24)
    teacher, student = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    lp, ids = _teacher_topk(teacher, K, 1.0)
    mask = _mask()
    base = logit_imitation_loss(student, lp, ids, mask)
    s2, lp2, ids2 = student.clone(), lp.clone(), ids.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])
    lp2[~mask] = float("nan")
    ids2[~mask] = -100  # padding ids need not be valid indices
    s2.requires_grad_(True)
    out = logit_imitation_loss(s2, lp2, ids2, mask.float())
    torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7)
    out.backward()
    assert torch.isfinite(s2.grad).all() and torch.all(s2.grad[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_half_inputs_give_fp32(dtype):
    g = _gen(25)
    teacher, student = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    lp, ids = _teacher_topk(teacher, K, 1.0)
    mask = _mask()
    out = logit_imitation_loss(student.to(dtype), lp.half(), ids, mask)
    assert out.dtype == torch.float32
    expected = ref_topk_kl(student.to(dtype).double(), lp.half().double(), ids, mask, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, logit_imitation_loss(student, lp, ids, mask), rtol=0.05, atol=0.01)


def test_kl_empty_mask_and_bad_temperature():
    g = _gen(26)
    student = torch.randn(B, T, V, generator=g).requires_grad_(True)
    lp, ids = _teacher_topk(torch.randn(B, T, V, generator=g), K, 1.0)
    out = logit_imitation_loss(student, lp, ids, torch.zeros(B, T, dtype=torch.bool))
    assert out.item() == 0.0 and out.dtype == torch.float32
    out.backward()
    assert torch.all(student.grad == 0)
    with pytest.raises(ValueError):
        logit_imitation_loss(student, lp, ids, torch.ones(B, T), temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# causal_lm_loss
# ----------------------------------------------------------------------------------------------------------------------


def test_causal_lm_loss_matches_reference_and_ignores_minus_100():
    g = _gen(30)
    logits = torch.randn(B, T, V, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, 3] = -100
    out = causal_lm_loss(logits, labels)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(ref_ce(logits.detach(), labels), rel=1e-5)
    out.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, -1] == 0)  # the last position predicts nothing
    assert torch.all(logits.grad[1, 2] == 0)  # its target (labels[1, 3]) is ignored
    # the first label is never a target
    labels2 = labels.clone()
    labels2[:, 0] = torch.tensor([3, 7])
    assert torch.equal(causal_lm_loss(logits, labels2), out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_causal_lm_loss_half_inputs(dtype):
    g = _gen(31)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    out = causal_lm_loss(logits.to(dtype), labels)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_ce(logits.to(dtype).float(), labels), rel=1e-5)
    assert out.item() == pytest.approx(causal_lm_loss(logits, labels).item(), rel=0.02)


def test_causal_lm_loss_all_ignored_is_zero():
    logits = torch.randn(B, T, V, generator=_gen(32)).requires_grad_(True)
    out = causal_lm_loss(logits, torch.full((B, T), -100))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------------------------------------------------
# dynamic_weight
# ----------------------------------------------------------------------------------------------------------------------


def test_dynamic_weight_value_and_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    ce = (x * 1.5).square()  # 9
    term = x * 0.25  # 0.5
    w = dynamic_weight(ce, term)
    assert not w.requires_grad and w.dtype == torch.float32
    assert w.item() == pytest.approx(9.0 / (0.5 + 1e-8))
    weighted = w * term
    assert weighted.item() == pytest.approx(ce.item(), rel=1e-6)  # value of CE...
    weighted.backward()
    assert x.grad.item() == pytest.approx(w.item() * 0.25, rel=1e-6)  # ...gradient of the (scaled) term
    assert dynamic_weight(torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(0.0)).item() == pytest.approx(1e8)
    assert dynamic_weight(torch.tensor(3.0), torch.tensor(1.0), eps=1.0).item() == pytest.approx(1.5)


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample reductions (the trainer's replay terms) and token_nll
# ----------------------------------------------------------------------------------------------------------------------


def test_per_sample_terms_equal_each_sample_alone():
    """per_sample=True gives, for every row, what the batch-of-one call gives: the official per-device-batch-1 value,
    whatever else shares the batch."""
    lower, upper = _thresholds()
    labels = threshold_labels(_hidden_with_ties(3, lower, upper), lower, upper)
    hidden = _hidden_with_ties(4, lower, upper)
    reference = _hidden_with_ties(5, lower, upper)
    g = _gen(40)
    teacher = torch.randn(B, T, V, generator=g) * 2
    student = teacher + torch.randn(B, T, V, generator=g)
    lp, ids = _teacher_topk(teacher, K, 1.0)
    mask = _mask()
    per = {
        "tm": threshold_margin_loss(hidden, labels, lower, upper, mask, per_sample=True),
        "l1": feature_imitation_loss(hidden, reference, mask, p=1, per_sample=True),
        "l2": feature_imitation_loss(hidden, reference, mask, p=2, per_sample=True),
        "kl": logit_imitation_loss(student, lp, ids, mask, per_sample=True),
    }
    for b in range(B):
        rows = slice(b, b + 1)
        alone = {
            "tm": threshold_margin_loss(hidden[rows], labels[rows], lower, upper, mask[rows]),
            "l1": feature_imitation_loss(hidden[rows], reference[rows], mask[rows], p=1),
            "l2": feature_imitation_loss(hidden[rows], reference[rows], mask[rows], p=2),
            "kl": logit_imitation_loss(student[rows], lp[rows], ids[rows], mask[rows]),
        }
        for name, value in alone.items():
            assert per[name].shape == (B,)
            torch.testing.assert_close(per[name][b], value, msg=name)
    # A sample with no kept token is 0, not NaN.
    empty = torch.zeros(B, T, dtype=torch.bool)
    assert torch.equal(threshold_margin_loss(hidden, labels, lower, upper, empty, per_sample=True), torch.zeros(B))


def test_token_nll_sums_to_causal_lm_loss():
    from gere_hf.losses import token_nll

    g = _gen(41)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    nll, targets = token_nll(logits, labels)
    assert nll.shape == targets.shape == (B, T) and nll.dtype == torch.float32
    assert not targets[:, -1].any() and torch.all(nll[~targets] == 0)
    assert float(nll.sum() / targets.sum()) == pytest.approx(float(causal_lm_loss(logits, labels)), rel=1e-6)
    assert float(nll.sum()) == pytest.approx(ref_ce(logits, labels) * int(targets.sum()), rel=1e-5)


# -- the step loss (docs/losses.md, "Total loss used by the trainer") -------------------------------------------------


def _reference_step_loss(task, replay, share, weight, reduction):
    """Each row of the total-loss table, written out with plain Python over (nll sum, targets[, term]) tuples."""
    n_t, n_r = len(task), len(replay)
    ce = [nll / max(t, 1) for nll, t in task]
    ce_r = [nll / max(t, 1) for nll, t, _ in replay]
    if reduction == "sample_mean":
        big_t, big_r = sum(ce) / n_t, sum(ce_r) / n_r
    else:
        big_t = sum(nll for nll, _ in task) / sum(t for _, t in task)
        big_r = sum(nll for nll, _, _ in replay) / sum(t for _, t, _ in replay)
    s = n_r / (n_t + n_r) if share is None else share
    task_mb = big_t  # one micro-batch: the micro-batch's task CE is the step's
    weights = []
    for (_, _, term), c in zip(replay, ce_r):
        if weight is not None:
            weights.append(weight)
        else:
            target = c if share is None else (1 - s) * task_mb + s * c
            weights.append(target / (term + 1e-8))
    term_mean = sum(w * term for w, (_, _, term) in zip(weights, replay)) / n_r
    if share is None:
        return (1 - s) * big_t + s * (big_r + term_mean)
    return (1 - s) * big_t + s * big_r + term_mean


@pytest.mark.parametrize("reduction", ["sample_mean", "token_mean"])
@pytest.mark.parametrize("share", [None, 0.5, 0.2])
@pytest.mark.parametrize("weight", [None, 1.0, 100.0])
def test_each_row_of_the_total_loss_table(reduction, share, weight):
    from gere_hf.losses import StepCounts, replay_step_loss

    g = torch.Generator().manual_seed(0)
    task = [(float(torch.rand(1, generator=g)) * 20, int(t)) for t in (1, 3, 17, 2, 9)]
    replay = [(float(torch.rand(1, generator=g)) * 200, int(t), float(torch.rand(1, generator=g)))
              for t in (40, 12, 63)]
    counts = StepCounts(task_samples=5, replay_samples=3, task_targets=sum(t for _, t in task),
                        replay_targets=sum(t for _, t, _ in replay))
    got = replay_step_loss(torch.tensor([x for x, _ in task]), torch.tensor([t for _, t in task]), counts,
                           torch.tensor([x for x, _, _ in replay]), torch.tensor([t for _, t, _ in replay]),
                           torch.tensor([x for _, _, x in replay]), share=share, weight=weight, reduction=reduction)
    expected = _reference_step_loss(task, replay, share, weight, reduction)
    assert float(got.total) == pytest.approx(expected, rel=1e-6)
    assert float(sum(got.parts.values())) == pytest.approx(float(got.total), rel=1e-6)
    assert got.share == pytest.approx(3 / 8 if share is None else share)


@pytest.mark.parametrize("reduction", ["sample_mean", "token_mean"])
def test_the_step_loss_does_not_depend_on_the_micro_batch_split(reduction):
    """Two micro-batches (replay in the second only) sum to the one-micro-batch step, and 2 processes (world 2, each
    half) average to it, as DDP averages their gradients."""
    from gere_hf.losses import StepCounts, replay_step_loss

    task_nll, task_t = torch.tensor([3.0, 8.0, 1.0, 40.0]), torch.tensor([2, 5, 1, 30])
    rep_nll, rep_t, term = torch.tensor([90.0, 20.0]), torch.tensor([50, 10]), torch.tensor([0.3, 0.1])
    counts = StepCounts(4, 2, int(task_t.sum()), int(rep_t.sum()))

    def loss(a, b, replay, world=1):
        r = (rep_nll[replay], rep_t[replay], term[replay]) if replay is not None else (None, None, None)
        return replay_step_loss(task_nll[a:b], task_t[a:b], counts, *r, weight=2.0, reduction=reduction,
                                world_size=world).total

    whole = loss(0, 4, slice(0, 2))
    split = loss(0, 2, None) + loss(2, 4, slice(0, 2))
    processes = (loss(0, 2, slice(0, 1), world=2) + loss(2, 4, slice(1, 2), world=2)) / 2
    assert float(split) == pytest.approx(float(whole), rel=1e-6)
    assert float(processes) == pytest.approx(float(whole), rel=1e-6)


def test_a_step_without_replay_is_the_task_ce():
    from gere_hf.losses import StepCounts, replay_step_loss

    got = replay_step_loss(torch.tensor([4.0, 6.0]), torch.tensor([2, 3]), StepCounts(2, 0, 5, 0))
    assert float(got.total) == pytest.approx((2.0 + 2.0) / 2) and got.share == 0.0 and got.replay_ce is None
    with pytest.raises(ValueError, match="reduction"):
        replay_step_loss(torch.tensor([1.0]), torch.tensor([1]), StepCounts(1, 0, 1, 0), reduction="tokens")


def test_a_capped_dynamic_weight_is_dy_until_the_cap():
    """'dy:C': w_j = min(CE_j / term_j, C). A large term keeps the dy value; a tiny one, whose dy weight would blow
    its gradient up, is held at C."""
    from gere_hf.losses import StepCounts, replay_step_loss

    counts = StepCounts(2, 2, 4, 20)
    args = (torch.tensor([4.0, 4.0]), torch.tensor([2, 2]), counts, torch.tensor([30.0, 30.0]),
            torch.tensor([10, 10]), torch.tensor([1.5, 0.001]))
    free = replay_step_loss(*args)
    capped = replay_step_loss(*args, weight_cap=10.0)
    weights = [3.0 / 1.5, min(3.0 / 0.001, 10.0)]
    assert float(capped.replay_weight) == pytest.approx(sum(weights) / 2)
    assert float(free.replay_weight) == pytest.approx((2.0 + 3000.0) / 2, rel=1e-4)
    expected_term = (weights[0] * 1.5 + weights[1] * 0.001) / 2
    assert float(capped.parts["replay_term"]) == pytest.approx(0.5 * expected_term, rel=1e-5)
