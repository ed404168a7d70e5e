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
from peft import PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from test_trainer import REPLAY_TEXTS, TOK, _args, _lm_dataset, _model
from transformers import DataCollatorForLanguageModeling

from gere_hf import GeReConfig, GeReConfigError, GeReTrainer, ReferenceStates, ReplaySet
from gere_hf.trainer import virtual_token_count

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
NEEDS_TASK_IDS = {"MULTITASK_PROMPT_TUNING", "POLY"}
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
    if name in NEEDS_TASK_IDS:
        with pytest.raises(GeReConfigError, match="task ids"):
            _trainer(tmp_path, model, store, name)
        return
    assert virtual_token_count(model) == VIRTUAL_TOKENS.get(name, 0)
    trainer = _trainer(tmp_path, model, store, name)
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"])) and log["replay_term"] >= 0 and log["replay_samples_seen"] == 4


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
