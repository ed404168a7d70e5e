"""GeReTrainer / GeReSFTTrainer against their parents and against the loss definitions (tiny random Llama, CPU)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from gere_hf import (
    GeReConfig,
    GeReSFTTrainer,
    GeReTrainer,
    GeReTrainingError,
    ReferenceStates,
    ReferenceStatesMismatch,
    ReplaySet,
)
from gere_hf.models import tiny_llama

TOK = ByT5Tokenizer()
REPLAY_TEXTS = [
    f"Replay text {i}. " + " ".join(["general", "knowledge", "about", "rivers", "and", "stars"][: 1 + i % 6]) * (1 + i % 4)
    for i in range(24)
]


def _model(seed=0):
    return tiny_llama(hidden_size=32, seed=seed, attn_implementation="eager")


def _lm_dataset(n=32):
    ds = Dataset.from_dict({"text": [f"Q: {i} plus {i}? A: {2 * i}." for i in range(n)]})
    return ds.map(lambda b: TOK(b["text"]), batched=True, remove_columns=["text"])


def _sft_dataset(n=32):
    return Dataset.from_dict({"prompt": [f"Q: {i} plus {i}?" for i in range(n)], "completion": [f" {2 * i}" for i in range(n)]})


def _args(tmp_path, bs=4, ga=1, steps=4, **kw):
    return TrainingArguments(
        str(tmp_path / "out"), per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=steps,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        learning_rate=1e-3, **kw,
    )


@pytest.fixture(scope="module")
def replay_store(tmp_path_factory):
    replay = ReplaySet.from_texts(REPLAY_TEXTS, TOK, max_length=64)
    path = tmp_path_factory.mktemp("store") / "store"
    store = ReferenceStates.build(_model(), replay, str(path), batch_size=4, extras=("hidden", "topk"), topk=8,
                                  progress=False)
    return replay, store


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_same_weights(a, b, atol=1e-6):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=atol, rtol=0), name


# -- identities ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ga", [1, 4])
def test_loss_none_trains_exactly_like_trainer(tmp_path, ga):
    collator = DataCollatorForLanguageModeling(TOK, mlm=False)
    runs = []
    for cls, extra in ((Trainer, {}), (GeReTrainer, {"gere_config": GeReConfig(loss="none")})):
        model = _model()
        trainer = cls(model=model, args=_args(tmp_path, bs=8 // ga, ga=ga), train_dataset=_lm_dataset(),
                      data_collator=collator, processing_class=TOK, **extra)
        trainer.train()
        runs.append((trainer, model))
    (plain, m_plain), (gere, m_gere) = runs
    assert _losses(plain) == pytest.approx(_losses(gere), abs=1e-6, rel=0)
    assert len(_losses(plain)) == 4
    _assert_same_weights(m_plain, m_gere)


@pytest.mark.parametrize("ga", [1, 4])
def test_loss_none_trains_exactly_like_sft_trainer(tmp_path, ga):
    runs = []
    for cls, extra in ((SFTTrainer, {}), (GeReSFTTrainer, {"gere_config": GeReConfig(loss="none")})):
        model = _model()
        args = SFTConfig(str(tmp_path / cls.__name__), per_device_train_batch_size=8 // ga, gradient_accumulation_steps=ga,
                         max_steps=3, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         seed=0, disable_tqdm=True, learning_rate=1e-3)
        trainer = cls(model=model, args=args, train_dataset=_sft_dataset(), processing_class=TOK, **extra)
        trainer.train()
        runs.append((trainer, model))
    (plain, m_plain), (gere, m_gere) = runs
    assert _losses(plain) == pytest.approx(_losses(gere), abs=1e-6, rel=0)
    _assert_same_weights(m_plain, m_gere)


@pytest.mark.parametrize("loss,bound", [("tm", 1e-6), ("kl", 1e-5), ("l1", 2e-3), ("l2", 1e-5)])
def test_replay_term_is_zero_at_the_first_step_when_the_model_is_the_reference(tmp_path, replay_store, loss, bound):
    """The store was built from this very model: TM is 0; KL/L1/L2 are 0 up to the fp16 rounding of stored extras."""
    replay, store = replay_store
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss=loss, replay_per_step=4, weight="1.0", topk=8),
                          reference_states=store)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_term"] <= bound
    assert log["replay_samples_seen"] == 4
    assert log["replay_ce"] > 0 and log["task_loss"] > 0


class _GrabFirstGrads(TrainerCallback):
    """The gradients of the first optimizer step, before clipping would change them (run with max_grad_norm=0)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _perturbed_model():
    """The store's model with its final norm scaled: the TM term is then non-zero from the first step."""
    model = _model()
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    return model


@pytest.mark.parametrize("loss,weight,share", [
    ("ce", "dy", "samples"), ("tm", "dy", "samples"), ("tm", "1.0", "samples"), ("tm", "1.0", "0.5"),
    ("kl", "2.0", "0.25"), ("l2", "dy", "samples"),
])
def test_step_is_invariant_to_how_it_is_split_into_micro_batches(tmp_path, replay_store, loss, weight, share):
    """1 micro-batch of 8 or 4 micro-batches of 2: the same step, the same gradients and loss (CE terms are step
    token means, replay terms means of per-sample values, the share counts the step's samples). The 2-process case
    is in test_trainer_distributed.py."""
    _, store = replay_store
    runs = []
    for bs, ga in ((8, 1), (2, 4)):
        grab = _GrabFirstGrads()
        trainer = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path, bs=bs, ga=ga, steps=1, max_grad_norm=0.0),
                              train_dataset=_lm_dataset(), data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                              processing_class=TOK, callbacks=[grab],
                              gere_config=GeReConfig(loss=loss, weight=weight, replay_share=share, replay_per_step=4,
                                                     topk=8), reference_states=store)
        trainer.train()
        runs.append((grab.grads, trainer.state.log_history[0]))
    (grads_a, log_a), (grads_b, log_b) = runs
    assert log_a["loss"] == pytest.approx(log_b["loss"], rel=1e-5)
    assert log_a["replay_share"] == log_b["replay_share"] == pytest.approx(4 / 12 if share == "samples" else float(share))
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def _same_length_lm_dataset(n=8):
    """Task texts of one length (ByT5 is byte-level): every sample has the same number of targets."""
    ds = Dataset.from_dict({"text": [f"Q: {i:02d} plus {i:02d}? A: {2 * i:03d}." for i in range(n)]})
    return ds.map(lambda b: TOK(b["text"]), batched=True, remove_columns=["text"])


@pytest.mark.parametrize("bs,ga", [(8, 1), (1, 8)])
def test_samples_share_matches_the_official_per_sample_loop(tmp_path, bs, ga):
    """The paper's runs: per-device batch 1 with gradient accumulation over the step's samples, each micro-batch one
    sample: a task sample contributes its CE, a replay sample its CE + w·TM with w = CE/TM ('dy'), each divided by
    the number of micro-batches. Written out here, on 8 task and 4 replay samples of one token count; GeReTrainer
    with the default replay_share='samples' must give the same loss and gradients in one micro-batch of 8, and with
    per-device batch 1 (8 micro-batches, the replay samples in every other one)."""
    from gere_hf.losses import threshold_margin_loss
    from gere_hf.reference import unpack_labels

    tasks = _same_length_lm_dataset(8)
    length = len(tasks[0]["input_ids"])  # with the eos the tokenizer appends
    texts = [(f"Replay {i} " + "abcdefghijklmnopqrstuvwxyz"[i:]) * 4 for i in range(4)]
    replay = ReplaySet.from_texts([t[:length] for t in texts], TOK, max_length=64)  # no eos: the same token count
    assert set(replay.lengths) == {length}
    store = ReferenceStates.build(_model(), replay, str(tmp_path / "store"), batch_size=4, progress=False)

    # The official formulation, written out.
    model = _perturbed_model()
    norm_out = []
    model.model.norm.register_forward_hook(lambda _m, _i, out: norm_out.append(out))
    micro_batches = len(tasks) + len(replay)
    total = 0.0
    for row in tasks:
        ids = torch.tensor([row["input_ids"]])
        loss_i = model(input_ids=ids, labels=ids).loss
        (loss_i / micro_batches).backward()
        total += float(loss_i) / micro_batches
    for i in range(len(replay)):
        ids = torch.tensor([replay.input_ids[i]])
        out = model(input_ids=ids, labels=ids)
        labels = unpack_labels(torch.from_numpy(store.packed_labels(i).copy()), length * store.hidden_size)
        tm = threshold_margin_loss(norm_out[-1], labels.view(1, length, -1), store.lower, store.upper,
                                   torch.ones(1, length))
        assert tm > 0
        w = out.loss.detach() / (tm.detach() + 1e-8)
        loss_i = out.loss + w * tm
        (loss_i / micro_batches).backward()
        total += float(loss_i) / micro_batches
    official = {n: p.grad.clone() for n, p in model.named_parameters()}

    grab = _GrabFirstGrads()
    trainer = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path, bs=bs, ga=ga, steps=1, max_grad_norm=0.0),
                          train_dataset=tasks, data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                          processing_class=TOK, callbacks=[grab], reference_states=store,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_share"] == pytest.approx(4 / 12)
    assert log["loss"] == pytest.approx(total, abs=1e-5, rel=0)
    for name, grad in official.items():
        torch.testing.assert_close(grab.grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


# -- the per-sample loop with unequal lengths (issue 18 §1) -------------------------------------------------------------

UNEQUAL_TASKS = ["Q: 7?", "A longer question about the rivers of Europe and their sources: which is longest?",
                 "x = 1", "What is 12 plus 30?", "Name a star.", "Sentiment of: an unforgettable, moving film!",
                 "ok", "The Danube flows through ten countries; name three of them, in order, from west to east."]
UNEQUAL_REPLAY = ["Rivers carry water to the sea.",
                  "The Pacific Ocean is the largest and deepest of the world's oceans, covering about a third.",
                  "Stars are suns.", "Photosynthesis converts light energy into chemical energy stored in sugars."]


def _unequal_tasks():
    return Dataset.from_dict({"text": UNEQUAL_TASKS}).map(lambda b: TOK(b["text"]), batched=True,
                                                          remove_columns=["text"])


def per_sample_loop(model, task_rows, store, loss="tm"):
    """The paper's runs written out: per-device batch 1, accumulation over all of the step's samples. A task sample's
    loss is its own token-mean CE; a replay sample's, its CE + w·TM with w = CE/TM ('dy'); each is divided by the
    number of micro-batches and backpropagated. Returns (step loss, gradients)."""
    from gere_hf.losses import threshold_margin_loss

    norm_out = []
    hook = model.model.norm.register_forward_hook(lambda _m, _i, out: norm_out.append(out))
    micro_batches = len(task_rows) + len(store)
    total = 0.0
    for ids in task_rows:
        ids = torch.tensor([ids])
        loss_i = model(input_ids=ids, labels=ids).loss
        (loss_i / micro_batches).backward()
        total += float(loss_i.detach()) / micro_batches
    for i in range(len(store)):
        ids = torch.tensor([store.input_ids(i).tolist()])
        out = model(input_ids=ids, labels=ids)
        loss_i = out.loss
        if loss == "tm":
            tm = threshold_margin_loss(norm_out[-1], store.labels(i).unsqueeze(0), store.lower, store.upper,
                                       torch.ones(ids.shape))
            loss_i = loss_i + out.loss.detach() / (tm.detach() + 1e-8) * tm
        (loss_i / micro_batches).backward()
        total += float(loss_i.detach()) / micro_batches
    hook.remove()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def unequal_store(tmp_path_factory):
    replay = ReplaySet.from_texts(UNEQUAL_REPLAY, TOK, max_length=128)
    assert len(set(replay.lengths)) == 4  # 16 to 93 tokens
    return ReferenceStates.build(_model(), replay, str(tmp_path_factory.mktemp("unequal") / "store"), batch_size=4,
                                 progress=False)


@pytest.mark.parametrize("loss", ["tm", "ce"])
@pytest.mark.parametrize("bs,ga", [(8, 1), (1, 8), (4, 2)])
def test_every_sample_counts_once_with_unequal_lengths(tmp_path, unequal_store, bs, ga, loss):
    """Task samples of 3 to 91 targets and replay samples of 16 to 93 tokens: the default step (replay_share
    'samples', ce_reduction 'sample_mean') equals the per-sample loop in loss and gradients to 1e-5, for one
    micro-batch of 8, per-device batch 1 with 8 accumulation steps, and 4 × 2. (A token mean within each kind, as
    before, differed from the loop by up to 12 % of the gradient.)"""
    tasks = _unequal_tasks()
    assert len({len(r) for r in tasks["input_ids"]}) == 7  # 3 to 92 tokens
    total, official = per_sample_loop(_perturbed_model(), tasks["input_ids"], unequal_store, loss)
    grab = _GrabFirstGrads()
    trainer = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path, bs=bs, ga=ga, steps=1, max_grad_norm=0.0),
                          train_dataset=tasks, data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                          processing_class=TOK, callbacks=[grab], reference_states=unequal_store,
                          gere_config=GeReConfig(loss=loss, replay_per_step=4))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_share"] == pytest.approx(4 / 12)
    assert log["loss"] == pytest.approx(total, abs=1e-5, rel=0)
    for name, grad in official.items():
        torch.testing.assert_close(grab.grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_token_mean_weighs_tokens_within_each_kind(tmp_path, unequal_store):
    """ce_reduction='token_mean' (TRL's SFT step): the task CE and the replay CE are means over the step's target
    tokens, (1 − s)·Σ nll / n_targets + s·(Σ nll_r / n_targets_r + mean w·term), and differ from the per-sample loop
    when the lengths differ."""
    tasks = _unequal_tasks()
    model = _perturbed_model()
    batch = DataCollatorForLanguageModeling(TOK, mlm=False)([{"input_ids": r} for r in tasks["input_ids"]])
    with torch.no_grad():
        task_loss = float(model(**batch).loss)  # Trainer's token mean over the batch
    trainer = GeReTrainer(model=model, args=_args(tmp_path, bs=8, steps=1),
                          train_dataset=tasks, data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                          processing_class=TOK, reference_states=unequal_store,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4, weight="0.5", ce_reduction="token_mean"))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["task_loss"] == pytest.approx(task_loss, rel=1e-5)
    s = 4 / 12
    assert log["loss"] == pytest.approx((1 - s) * log["task_loss"] + s * (log["replay_ce"] + 0.5 * log["replay_term"]),
                                        rel=1e-5)
    total, _ = per_sample_loop(_perturbed_model(), tasks["input_ids"], unequal_store, "ce")
    per_sample = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path / "s", bs=8, steps=1),
                             train_dataset=tasks, data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                             processing_class=TOK, reference_states=unequal_store,
                             gere_config=GeReConfig(loss="ce", replay_per_step=4, ce_reduction="token_mean"))
    per_sample.train()
    assert abs(per_sample.state.log_history[0]["loss"] - total) > 1e-3


@pytest.mark.parametrize("share", ["samples", "0.5"])
def test_logged_terms_match_the_loss_definitions(tmp_path, replay_store, share):
    """One step, GA 1, fixed weight w: 'samples' logs (1 − s)·task + s·(replay CE + w·TM) with s = 4/(8 + 4); a fixed
    share s logs (1 − s)·task + s·replay CE + w·TM (the official mixed micro-batch formula at s = ½)."""
    _, store = replay_store
    trainer = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path, bs=8, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4, weight="0.5", replay_share=share),
                          reference_states=store)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_term"] > 0
    s = log["replay_share"]
    if share == "samples":
        assert s == pytest.approx(4 / 12)
        expected = (1 - s) * log["task_loss"] + s * (log["replay_ce"] + 0.5 * log["replay_term"])
    else:
        assert s == 0.5
        expected = (log["task_loss"] + log["replay_ce"]) / 2 + 0.5 * log["replay_term"]
    assert log["loss"] == pytest.approx(expected, rel=1e-4)


def test_dynamic_weight_makes_the_term_worth_the_replay_ce(tmp_path, replay_store):
    """'dy' with the default share: w_i·TM_i = replay CE_i, so the step loss is (1 − s)·task + 2·s·replay CE (as in
    the official code's replay-only micro-batch), not the mean of task and replay CE."""
    _, store = replay_store
    trainer = GeReTrainer(model=_perturbed_model(), args=_args(tmp_path, bs=8, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4), reference_states=store)
    trainer.train()
    log = trainer.state.log_history[0]
    s = log["replay_share"]
    assert log["replay_term"] > 0
    # The replay CE is a token mean, the dy term a mean of per-sample CEs: equal up to the samples' lengths.
    assert log["loss"] == pytest.approx((1 - s) * log["task_loss"] + 2 * s * log["replay_ce"], rel=0.05)


def test_replay_share_default_counts_the_epoch_mix(tmp_path, replay_store):
    """Without replay_per_step every replay sample is used once per epoch: the share of a step is its replay
    samples over all of its samples (24 replay samples spread over 8 steps of 4 task samples: 3 / 7)."""
    _, store = replay_store
    args = TrainingArguments(str(tmp_path / "epoch"), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = GeReTrainer(model=_model(), args=args, train_dataset=_lm_dataset(32),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="ce"), reference_states=store)
    trainer.train()
    shares = [h["replay_share"] for h in trainer.state.log_history if "loss" in h]
    assert len(shares) == 8 and all(x == pytest.approx(3 / 7) for x in shares)


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "half", "nan"])
def test_bad_replay_share_is_refused(bad):
    from gere_hf import GeReConfigError

    with pytest.raises(GeReConfigError, match="replay_share"):
        GeReConfig(replay_share=bad)


def test_sft_trainer_with_tm_and_peft_config_trains_and_logs(tmp_path):
    from peft import LoraConfig

    args = SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-3)
    trainer = GeReSFTTrainer(
        model=_model(), args=args, train_dataset=_sft_dataset(), processing_class=TOK,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        gere_config=GeReConfig(loss="tm", replay_source=_replay_dataset(), replay_num_samples=12, replay_max_length=48,
                               replay_per_step=2, store_dir=str(tmp_path / "store")),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("replay_term" in h and "replay_ce" in h for h in logs)
    assert logs[-1]["replay_samples_seen"] == 6
    assert ReferenceStates.is_store(str(tmp_path / "store"))


def _replay_dataset():
    return Dataset.from_dict({"text": REPLAY_TEXTS})


# -- bad input ----------------------------------------------------------------------------------------------------------


def test_batch_interpolation_with_per_device_batch_one(tmp_path, replay_store):
    """The paper's runs: per-device batch 1, 16 accumulation steps, 4 replay samples per step. They land in every
    fourth micro-batch; the others replay nothing, and the step's share counts 4 of 20 samples."""
    _, store = replay_store
    carried = []

    class Record(GeReTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            carried.append(len(inputs["gere_indices"]) if "gere_indices" in inputs else 0)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Record(model=_model(), args=_args(tmp_path, bs=1, ga=16, steps=2), train_dataset=_lm_dataset(),
                     data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                     gere_config=GeReConfig(loss="tm", replay_per_step=4), reference_states=store)
    trainer.train()
    assert carried == ([0, 0, 0, 1] * 4) * 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["replay_share"] for h in logs] == [pytest.approx(4 / 20)] * 2 and logs[-1]["replay_samples_seen"] == 8


def test_task_batch_without_labels_is_a_clear_error(tmp_path, replay_store):
    _, store = replay_store

    def no_labels(features):
        batch = DataCollatorForLanguageModeling(TOK, mlm=False)(features)
        batch.pop("labels")
        return batch

    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(),
                          data_collator=no_labels, processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4), reference_states=store)
    with pytest.raises(GeReTrainingError, match="no 'labels'"):
        trainer.train()


def test_store_for_another_replay_set_is_refused(tmp_path, replay_store):
    _, store = replay_store
    other = ReplaySet.from_texts(REPLAY_TEXTS[:-1], TOK, max_length=64)
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4, store_dir=store.path), replay_set=other)
    with pytest.raises(ReferenceStatesMismatch, match="replay"):
        trainer.train()


def test_data_parallel_is_refused_before_training(tmp_path):
    """Plain `python train.py` on a multi-GPU machine: the Trainer would wrap the model in torch.nn.DataParallel.
    No such machine here: the arguments are told they see 2 GPUs in one process (what _setup_devices records there)."""
    from gere_hf import GeReConfigError

    args = _args(tmp_path)
    _ = args.n_gpu
    args._n_gpu = 2
    with pytest.raises(GeReConfigError, match=r"DataParallel.*accelerate launch"):
        GeReTrainer(model=_model(), args=args, train_dataset=_lm_dataset(), processing_class=TOK,
                    gere_config=GeReConfig(loss="tm"))
    GeReTrainer(model=_model(), args=args, train_dataset=_lm_dataset(), processing_class=TOK,
                gere_config=GeReConfig(loss="none"))  # without replay GeRe adds nothing to break


def test_store_of_other_frozen_base_weights_is_refused_under_peft(tmp_path, replay_store, caplog):
    """Under PEFT the adapter-free weights never change in a continual run: a store at store_dir recorded from other
    base weights belongs to another model. Full fine-tuning changes them by design: a warning with both hashes."""
    import logging

    from peft import LoraConfig, get_peft_model

    replay, store = replay_store
    other = get_peft_model(_model(seed=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    gere = GeReConfig(loss="tm", replay_per_step=4, store_dir=store.path, topk=8)
    trainer = GeReTrainer(model=other, args=_args(tmp_path / "peft", steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=gere, replay_set=replay)
    with pytest.raises(ReferenceStatesMismatch, match=r"(?s)model_weights.*frozen base weights differ") as info:
        trainer.train()
    stored, ours = info.value.differences["model_weights"]
    assert stored in str(info.value) and ours in str(info.value) and stored != ours
    trainer = GeReTrainer(model=_model(seed=1), args=_args(tmp_path / "full", steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=gere, replay_set=replay)
    with caplog.at_level(logging.WARNING, logger="gere_hf.trainer"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "weights" in r.getMessage()]
    assert len(warned) == 1 and stored in warned[0] and ours in warned[0]


def test_kl_store_of_another_temperature_is_refused(tmp_path, replay_store):
    _, store = replay_store
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="kl", topk=8, kl_temperature=4.0, replay_per_step=4),
                          reference_states=store)
    with pytest.raises(ReferenceStatesMismatch, match="topk_temperature"):
        trainer.train()


def test_model_without_final_norm_is_refused(tmp_path):
    from gere_hf import UnsupportedModelError

    model = _model()
    model.model.norm = None  # nothing feeds the LM head from a known norm any more
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        GeReTrainer(model=model, args=_args(tmp_path), train_dataset=_lm_dataset(), processing_class=TOK)


def test_nonfinite_loss_stops_naming_the_step_and_term(tmp_path, replay_store):
    _, store = replay_store
    model = _model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    trainer = GeReTrainer(model=model, args=_args(tmp_path, steps=2), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4), reference_states=store)
    with pytest.raises(GeReTrainingError, match=r"Non-finite loss at optimizer step 1.*task_loss"):
        trainer.train()


def test_tm_works_with_gradient_checkpointing(tmp_path, replay_store):
    _, store = replay_store
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=2, gradient_checkpointing=True),
                          train_dataset=_lm_dataset(), data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                          processing_class=TOK, gere_config=GeReConfig(loss="tm", replay_per_step=4),
                          reference_states=store)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["replay_term"] <= 1e-6


def _bf16_run(tmp_path, store, name, bf16=True, **gere):
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path / name, steps=2, bf16=bf16), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4, **gere), reference_states=store)
    return trainer


def test_store_recorded_at_another_precision_than_training_is_refused(tmp_path, replay_store):
    """An fp32 model with bf16=True trains under (CPU) autocast; a store cached outside train() in fp32 would make
    the first-step TM rounding noise times the dynamic weight. Refused before the first step, naming both."""
    _, store = replay_store
    assert store.fingerprint["precision"] == "float32"
    trainer = _bf16_run(tmp_path, store, "refused")
    with pytest.raises(ReferenceStatesMismatch, match=r"(?s)recorded at float32.*trains at bfloat16.*--dtype bf16"):
        trainer.train()
    assert trainer.state.global_step == 0
    # Asked for explicitly, it runs, and shows what the refusal prevents: a non-zero first-step term at a huge weight.
    trainer = _bf16_run(tmp_path, store, "explicit", store_dtype="float32")
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["replay_term"] > 0 and first["grad_norm"] > 100


def test_training_precision_follows_mixed_precision_and_the_base_weights(tmp_path):
    """bf16/fp16 arguments decide; without them the base weights' dtype does (a PEFT adapter kept in fp32 on a bf16
    model does not make it an fp32 run)."""
    from peft import LoraConfig, get_peft_model

    def precision(model, **kw):
        trainer = GeReTrainer(model=model, args=_args(tmp_path, **kw), train_dataset=_lm_dataset(),
                              processing_class=TOK, gere_config=GeReConfig(loss="tm"))
        return trainer.gere_training_precision()

    assert precision(_model()) == "float32" and precision(_model(), bf16=True) == "bfloat16"
    lora = get_peft_model(_model().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert any(p.dtype == torch.float32 for n, p in lora.named_parameters() if "lora_" in n)
    assert precision(lora) == "bfloat16"


def test_bf16_training_with_a_store_recorded_at_bf16(tmp_path):
    """A store cached outside train() at the training precision (`gere-hf cache --dtype bf16`): TM exactly 0 at the
    first step, and the first step's gradient norm within 1 % of the bf16=False run with an fp32 store."""
    replay = ReplaySet.from_texts(REPLAY_TEXTS, TOK, max_length=64)
    fp32 = ReferenceStates.build(_model(), replay, str(tmp_path / "fp32"), batch_size=4, progress=False)
    bf16 = ReferenceStates.build(_model(), replay, str(tmp_path / "bf16"), batch_size=4, dtype="bf16", progress=False)
    assert bf16.fingerprint["precision"] == "bfloat16" and bf16.manifest["precision"] == "bfloat16"
    first = {}
    for name, store, on in (("fp32", fp32, False), ("bf16", bf16, True)):
        trainer = _bf16_run(tmp_path, store, name, bf16=on)
        trainer.train()
        first[name] = trainer.state.log_history[0]
    assert first["bf16"]["replay_term"] == 0.0 and first["fp32"]["replay_term"] == 0.0
    assert first["bf16"]["grad_norm"] == pytest.approx(first["fp32"]["grad_norm"], rel=0.01)


def test_store_built_inside_train_records_the_training_precision(tmp_path):
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=1, bf16=True), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_source=_replay_dataset(), replay_num_samples=12,
                                                 replay_max_length=48, replay_per_step=4,
                                                 store_dir=str(tmp_path / "store")))
    trainer.train()
    assert trainer.gere_store.fingerprint["precision"] == "bfloat16"
    assert trainer.state.log_history[0]["replay_term"] == 0.0


def test_default_mix_uses_every_replay_sample_once_per_epoch(tmp_path, replay_store):
    _, store = replay_store
    seen = []

    class Record(GeReTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "gere_indices" in inputs:
                seen.extend(inputs["gere_indices"].tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = TrainingArguments(str(tmp_path / "epoch"), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=100)
    trainer = Record(model=_model(), args=args, train_dataset=_lm_dataset(32),
                     data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                     gere_config=GeReConfig(loss="ce"), reference_states=store)
    trainer.train()
    assert trainer.state.global_step == 8
    assert sorted(seen) == list(range(len(store)))


# -- CUDA (skipped without a GPU; benchmarks/gpu.sh runs them on the device machine) -----------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _device_args(tmp_path, cuda, **kw):
    return TrainingArguments(
        str(tmp_path / ("cuda" if cuda else "cpu")), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        report_to=[], use_cpu=not cuda, save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-3,
        max_grad_norm=0.0, **kw,
    )


@needs_cuda
def test_cuda_bf16_store_built_inside_train_gives_a_zero_first_term(tmp_path):
    """On the GPU with bf16 (accelerate's autocast there), the store built inside train() is recorded as the model
    runs: TM is exactly 0 at the first step, and the step is finite."""
    trainer = GeReTrainer(model=_model(), args=_device_args(tmp_path, True, bf16=True), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_source=_replay_dataset(), replay_num_samples=12,
                                                 replay_max_length=48, replay_per_step=4,
                                                 store_dir=str(tmp_path / "store")))
    trainer.train()
    first = trainer.state.log_history[0]
    assert trainer.gere_store.fingerprint["precision"] == "bfloat16"
    assert first["replay_term"] == 0.0 and torch.isfinite(torch.tensor(first["loss"]))


@needs_cuda
@pytest.mark.parametrize("loss", ["ce", "tm"])
def test_cuda_step_matches_the_cpu_step_in_fp32(tmp_path, replay_store, loss):
    """The same fp32 step on the GPU and on the CPU: the logged loss, replay terms and gradient norm agree to float32
    rounding (cuBLAS and CPU kernels sum in other orders); the store, built on the CPU, serves both."""
    _, store = replay_store
    logs = {}
    for cuda in (False, True):
        trainer = GeReTrainer(model=_perturbed_model(), args=_device_args(tmp_path, cuda), train_dataset=_lm_dataset(),
                              data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                              gere_config=GeReConfig(loss=loss, replay_per_step=4, weight="1.0"),
                              reference_states=store)
        trainer.train()
        logs[cuda] = trainer.state.log_history[0]
    keys = [k for k in ("loss", "task_loss", "replay_ce", "replay_term", "grad_norm") if k in logs[False]]
    assert {"loss", "replay_ce", "grad_norm"} <= set(keys)
    for key in keys:
        assert logs[True][key] == pytest.approx(logs[False][key], rel=2e-4, abs=1e-6), key


def test_replay_samples_seen_goes_on_after_a_resume(tmp_path, replay_store):
    """Resumed from a checkpoint, the logged count of replay samples continues from the checkpoint's step."""
    _, store = replay_store

    def trainer(out, **kw):
        args = TrainingArguments(str(out / "out"), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                                 disable_tqdm=True, learning_rate=1e-3, **kw)
        return GeReTrainer(model=_model(), args=args,
                           train_dataset=_lm_dataset(), data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                           processing_class=TOK, gere_config=GeReConfig(loss="tm", replay_per_step=3),
                           reference_states=store)

    whole = trainer(tmp_path / "whole")
    whole.train()
    resumed = trainer(tmp_path / "whole")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    seen = [h["replay_samples_seen"] for h in resumed.state.log_history if "loss" in h]
    assert seen[-2:] == [9, 12]
