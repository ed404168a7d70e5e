"""GeReSDFTTrainer: TRL's SDFT with GeRe replay (tiny random Llama with LoRA, CPU)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_trainer import REPLAY_TEXTS, TOK, _model

from gere_hf import GeReConfig, GeReConfigError
from gere_hf.evaluation.tasks import load_builtin_task
from gere_hf.sdft import DEFAULT_TEACHER_TEMPLATE, GeReSDFTTrainer, SDFTConfig, SDFTTrainer, sdft_dataset


def _dataset():
    return sdft_dataset(load_builtin_task("arithmetic", 32, 5).train)


def _args(tmp_path, steps=3):
    return SDFTConfig(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                      report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, learning_rate=1e-3,
                      num_generations=1, max_completion_length=8, teacher_prompt_template=DEFAULT_TEACHER_TEMPLATE,
                      disable_tqdm=True)


def _lora():
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _gere(tmp_path, **kw):
    return GeReConfig(replay_source=Dataset.from_dict({"text": REPLAY_TEXTS}), replay_num_samples=12,
                      replay_max_length=48, replay_per_step=2, store_dir=str(tmp_path / "store"), **kw)


def test_the_dataset_gives_the_teacher_a_worked_example():
    ds = sdft_dataset(Dataset.from_dict({"prompt": ["What is 2 + 2?\nAnswer:"], "completion": [" 4"]}))
    assert ds.column_names == ["prompt", "privileged_context"]
    assert ds[0]["privileged_context"] == "What is 2 + 2?\nAnswer: 4"
    teacher = DEFAULT_TEACHER_TEMPLATE.format(prompt=ds[0]["prompt"], privileged_context=ds[0]["privileged_context"])
    assert teacher.index(" 4") < teacher.rindex("What is 2 + 2?")  # the answer, then the question it answers
    with pytest.raises(GeReConfigError, match="'completion'"):
        sdft_dataset(Dataset.from_dict({"prompt": ["x"]}))


def test_loss_none_trains_exactly_like_sdft_trainer(tmp_path):
    runs = []
    for cls, extra in ((SDFTTrainer, {}), (GeReSDFTTrainer, {"gere_config": GeReConfig(loss="none")})):
        torch.manual_seed(0)
        trainer = cls(model=_model(), args=_args(tmp_path / cls.__name__), train_dataset=_dataset(),
                      processing_class=TOK, peft_config=_lora(), **extra)
        trainer.train()
        runs.append(trainer)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in runs]
    assert losses[0] == losses[1]
    for (name, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        assert torch.equal(a, b), name


def test_replay_joins_the_rollouts_of_a_step(tmp_path):
    trainer = GeReSDFTTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), processing_class=TOK,
                              peft_config=_lora(), gere_config=_gere(tmp_path, loss="tm"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # 4 rollouts and 2 replay samples a step; the model is its reference at the first step: TM is 0.
    assert all(h["replay_share"] == pytest.approx(2 / 6) for h in logs)
    assert logs[0]["replay_term"] == 0.0 and logs[-1]["replay_samples_seen"] == 6
    assert all("sdft/distillation_loss" in h and torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_token_mean_is_refused(tmp_path):
    with pytest.raises(GeReConfigError, match="sample_mean"):
        GeReSDFTTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), processing_class=TOK,
                        peft_config=_lora(), gere_config=_gere(tmp_path, loss="tm", ce_reduction="token_mean"))
