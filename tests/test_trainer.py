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
    ReplayScheduleError,
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
                          gere_config=GeReConfig(loss=loss, replay_per_step=4, weight="1.0"), reference_states=store)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_term"] <= bound
    assert log["replay_samples_seen"] == 4
    assert log["replay_ce"] > 0 and log["task_loss"] > 0


def test_ce_terms_are_invariant_to_gradient_accumulation(tmp_path, replay_store):
    """Same global batch as 1×8 or 4×2 micro-batches: the same gradients (task and replay CE are step token means)."""
    _, store = replay_store

    class Grab(TrainerCallback):
        def __init__(self):
            self.grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    grads = []
    for bs, ga in ((8, 1), (2, 4)):
        grab = Grab()
        trainer = GeReTrainer(model=_model(), args=_args(tmp_path, bs=bs, ga=ga, steps=1, max_grad_norm=0.0),
                              train_dataset=_lm_dataset(), data_collator=DataCollatorForLanguageModeling(TOK, mlm=False),
                              processing_class=TOK, callbacks=[grab],
                              gere_config=GeReConfig(loss="ce", replay_per_step=4), reference_states=store)
        trainer.train()
        grads.append(grab.grads)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_logged_terms_match_the_loss_definitions(tmp_path, replay_store):
    """One step, GA 1, fixed weight: the logged loss equals mean(task CE, replay CE) + w·TM."""
    _, store = replay_store
    model = _model()
    # Perturb the model so the TM term is non-zero.
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    trainer = GeReTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4, weight="0.5"), reference_states=store)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["replay_term"] > 0
    expected = (log["task_loss"] + log["replay_ce"]) / 2 + 0.5 * log["replay_term"]
    assert log["loss"] == pytest.approx(expected, rel=1e-4)


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


def test_replay_per_step_that_cannot_be_split_fails_before_training(tmp_path):
    with pytest.raises(ReplayScheduleError, match="multiple of 4"):
        GeReTrainer(model=_model(), args=_args(tmp_path, bs=2, ga=4), train_dataset=_lm_dataset(),
                    processing_class=TOK, gere_config=GeReConfig(replay_per_step=6))


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


@pytest.mark.parametrize("option", ["gradient_checkpointing", "bf16"])
def test_tm_works_with_gradient_checkpointing_and_bf16(tmp_path, replay_store, option):
    _, store = replay_store
    trainer = GeReTrainer(model=_model(), args=_args(tmp_path, steps=2, **{option: True}), train_dataset=_lm_dataset(),
                          data_collator=DataCollatorForLanguageModeling(TOK, mlm=False), processing_class=TOK,
                          gere_config=GeReConfig(loss="tm", replay_per_step=4), reference_states=store)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["replay_term"] <= (1e-6 if option == "gradient_checkpointing" else 0.5)


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
