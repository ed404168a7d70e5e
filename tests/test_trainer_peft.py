"""GeReTrainer with every PEFT method PEFT offers for causal LMs (tiny random Llama, CPU, one step each).

Prompt tuning, P-tuning and CPT prepend virtual tokens to every input: the replay terms must compare only the replay
text's positions with the store (which holds no state for virtual tokens). Methods that need per-sample task ids
cannot run replay texts and are refused when the trainer is built.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from datasets import Dataset
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from test_trainer import REPLAY_TEXTS, TOK, _args, _lm_dataset, _model
from transformers import DataCollatorForLanguageModeling

from gere_hf import GeReConfig, GeReConfigError, GeReTrainer, ReferenceStates, ReplaySet
from gere_hf.models import virtual_token_count

# Options that fit a 2-layer model of hidden size 32 (the defaults are sized for real models).
OPTIONS = {
    "ADALORA": {"total_step": 4},
    "ADAPTION_PROMPT": {"adapter_len": 4, "adapter_layers": 1, "target_modules": None},
    "VBLORA": {"vector_length": 8},
    "MISS": {"r": 8},
    "ROAD": {"group_size": 8},
    "SHIRA": {"r": 2},
    "C3A": {"block_size": 8},
    "WAVEFT": {"n_frequency": 16},
    "TRAINABLE_TOKENS": {"token_indices": [3, 4], "target_modules": ["embed_tokens"]},
    "CPT": {"cpt_token_ids": [5, 6, 7], "cpt_mask": [1, 1, 1], "cpt_tokens_type_mask": [1, 2, 3]},
}
# Refused when the trainer is built, with what the message names: methods that need a task id for every input
# (replay texts have none), and CPT, which trains with its own loss that GeRe's per-sample task CE would replace.
REFUSED = {"MULTITASK_PROMPT_TUNING": "task ids", "POLY": "task ids", "CPT": "CPT trains with its own loss"}
VIRTUAL_TOKENS = {"PROMPT_TUNING": 4, "P_TUNING": 4, "CPT": 3}
NOT_HERE = {
    "XLORA": "X-LoRA mixes already trained LoRA adapters; it has none to mix on a random model",
    "SHADOW": "PEFT's SHADOW fails on this model without GeRe too (plain Trainer: 'ShadowCarrier' has no 'view')",
}


def _peft_model(name: str):
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[name]]
    params = inspect.signature(config_cls).parameters
    options = {"task_type": "CAUSAL_LM"}
    if "target_modules" in params:
        options["target_modules"] = ["q_proj", "v_proj"]
    if "num_virtual_tokens" in params and name != "CPT":
        options["num_virtual_tokens"] = 4
    options.update(OPTIONS.get(name, {}))
    options = {k: v for k, v in options.items() if v is not None}
    return get_peft_model(_model(), config_cls(**options))


def _collator(name):
    base = DataCollatorForLanguageModeling(TOK, mlm=False)
    if name != "CPT":
        return base

    def with_type_mask(features):
        # CPT's own task loss reads its targets from input_type_mask: types shifted past the prompt's (1..3) to a
        # multiple of 4 are targets, so 1 marks every token as one.
        batch = base(features)
        batch["input_type_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    return with_type_mask


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    replay = ReplaySet.from_texts(REPLAY_TEXTS, TOK, max_length=64)
    return ReferenceStates.build(_model(), replay, str(tmp_path_factory.mktemp("peft") / "store"), batch_size=4,
                                 extras=("hidden", "topk"), topk=8, progress=False)


def _trainer(tmp_path, model, store, name, loss="tm"):
    return GeReTrainer(model=model, args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(16),
                       data_collator=_collator(name), processing_class=TOK, reference_states=store,
                       gere_config=GeReConfig(loss=loss, replay_per_step=4, topk=8))


@pytest.mark.parametrize("name", [t.value for t in PeftType])
def test_every_peft_method_trains_with_tm_or_is_refused(tmp_path, store, name):
    if name in NOT_HERE:
        pytest.skip(NOT_HERE[name])
    if name == "ADAMSS" and importlib.util.find_spec("sklearn") is None:
        pytest.skip("PEFT's AdaMSS needs scikit-learn, which is not installed")
    model = _peft_model(name)
    if name in REFUSED:
        with pytest.raises(GeReConfigError, match=REFUSED[name]):
            _trainer(tmp_path, model, store, name)
        return
    assert virtual_token_count(model) == VIRTUAL_TOKENS.get(name, 0)
    trainer = _trainer(tmp_path, model, store, name)
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"])) and log["replay_term"] >= 0 and log["replay_samples_seen"] == 4


@pytest.mark.parametrize("name", ["PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("loss", ["tm", "kl", "l2"])
def test_a_stage_start_store_of_a_prompt_learning_model_holds_the_text_positions(tmp_path, name, loss):
    """reference='stage_start' records through the PEFT model, virtual tokens included: the store keeps the text's
    positions only (thresholds too), so at the first step, with the model equal to its reference, the term is 0
    (TM was 0.85-0.89 before)."""
    trainer = GeReTrainer(model=_peft_model(name), args=_args(tmp_path, steps=1), train_dataset=_lm_dataset(16),
                          data_collator=_collator(name), processing_class=TOK,
                          gere_config=GeReConfig(loss=loss, replay_per_step=4, topk=8, reference="stage_start",
                                                 replay_source=Dataset.from_dict({"text": REPLAY_TEXTS}),
                                                 replay_num_samples=len(REPLAY_TEXTS), replay_max_length=64,
                                                 store_dir=str(tmp_path / "store")))
    trainer.train()
    store = trainer.gere_store
    assert store.num_tokens == sum(store.lengths)
    assert trainer.state.log_history[0]["replay_term"] == pytest.approx(0.0, abs=1e-5 if loss != "tm" else 0.0)


@pytest.mark.parametrize("name", ["PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("loss", ["tm", "kl", "l1", "l2"])
def test_virtual_tokens_are_not_compared_with_the_store(tmp_path, store, name, loss):
    """The hidden states and logits of a prompt-tuned model hold 4 virtual positions before the replay text (hidden
    (B, 4 + T, H) against stored labels (B, T, H): a crash at the first replay step before). Dropped, every replay
    term trains."""
    model = _peft_model(name)
    trainer = _trainer(tmp_path, model, store, name, loss=loss)
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"])) and log["replay_term"] >= 0


@pytest.mark.parametrize("name", [t.value for t in PeftType])
def test_the_base_weights_hash_leaves_every_peft_methods_adapters_out(name):
    """A PEFT model hashes as its base model, and still does after its trainable parameters move (what a stage
    does): a second stage on one 'base' store is not refused as "another base model" (IA3's ia3_l counted as base
    weights before). PEFT says which parameters are adapters (adapter_layer_names), for every method it offers."""
    if name in NOT_HERE or name in ("MULTITASK_PROMPT_TUNING", "POLY"):
        pytest.skip("needs task ids or does not build here")
    if name == "ADAMSS" and importlib.util.find_spec("sklearn") is None:
        pytest.skip("PEFT's AdaMSS needs scikit-learn, which is not installed")
    from gere_hf.reference import model_weights_hash

    base_hash = model_weights_hash(_model())
    model = _peft_model(name)
    assert model_weights_hash(model) == base_hash
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1 + 0.05)
    assert model_weights_hash(model) == base_hash


@pytest.mark.parametrize("name", ["IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "TRAINABLE_TOKENS", "OSF"])
def test_two_stages_share_one_base_store(tmp_path, name):
    """Stage 1 builds the 'base' store inside train(); stage 2, on the same model with its adapters trained, opens it
    and checks the base weights: accepted (IA3's second stage was refused as "another base model")."""
    model = _peft_model(name)
    config = GeReConfig(loss="tm", replay_per_step=4, replay_source=Dataset.from_dict({"text": REPLAY_TEXTS}),
                        replay_num_samples=len(REPLAY_TEXTS), replay_max_length=64, store_dir=str(tmp_path / "store"))
    for stage in (1, 2):
        trainer = GeReTrainer(model=model, args=_args(tmp_path / f"stage{stage}", steps=2),
                              train_dataset=_lm_dataset(16), data_collator=_collator(name), processing_class=TOK,
                              gere_config=config)
        trainer.train()
        assert trainer.state.global_step == 2
