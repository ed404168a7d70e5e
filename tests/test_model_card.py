# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The model cards the trainers write name GeRe and cite its paper (TRL's convention: _tag_names, _name, _paper), and
a loss='none' baseline's cards do not."""

from __future__ import annotations

import os

import pytest
from conftest import REPLAY_TEXTS, make_tiny_model
from datasets import Dataset
from transformers import ByT5Tokenizer, TrainingArguments
from trl import SFTConfig

from gere_hf import GeReConfig, GeReSFTTrainer, GeReTrainer
from gere_hf.paper import GERE_BIBTEX

pytestmark = pytest.mark.usefixtures("one_thread")

TITLE = "GeRe: Towards Efficient Anti-Forgetting in Continual Learning of LLM via General Samples Replay"
METHOD = f"This model was trained with GeRe, a method introduced in [{TITLE}](https://huggingface.co/papers/2508.04676)."


def _card(path) -> tuple[str, list[str]]:
    from huggingface_hub import ModelCard

    text = open(os.path.join(path, "README.md"), encoding="utf-8").read()
    return text, list(ModelCard(text).data.tags or [])


def _gere(loss):
    return GeReConfig(loss=loss, replay_source=Dataset.from_dict({"text": REPLAY_TEXTS}), replay_num_samples=8,
                      replay_max_length=32)


@pytest.mark.parametrize("loss", ["tm", "none"])
def test_sft_trainer_cards_follow_trl(tmp_path, loss):
    args = SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_steps=1)
    data = Dataset.from_dict({"prompt": ["Review: fine.\nSentiment:"] * 4, "completion": [" positive"] * 4})
    trainer = GeReSFTTrainer(model=make_tiny_model(), args=args, train_dataset=data, processing_class=ByT5Tokenizer(),
                             gere_config=_gere(loss))
    trainer.create_model_card(model_name="stage-1", dataset_name="sst2")
    text, tags = _card(tmp_path)
    if loss == "tm":
        assert METHOD in text and "Cite GeRe as:" in text and GERE_BIBTEX in text
        assert {"gere", "trl", "sft"} <= set(tags) and "gere" in trainer.model.model_tags
        assert "author={Yunan Zhang and Shuoran Jiang" in text
    else:  # plain SFT: TRL's SFT card, no claim of GeRe
        assert "trained with SFT" in text and "2508.04676" not in text and "gere" not in tags
        assert {"trl", "sft"} <= set(tags) and "gere" not in (trainer.model.model_tags or [])


@pytest.mark.parametrize("loss", ["tm", "none"])
def test_trainer_cards_name_the_method(tmp_path, loss):
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = GeReTrainer(model=make_tiny_model(), args=args, processing_class=ByT5Tokenizer(), gere_config=_gere(loss))
    trainer.create_model_card(model_name="stage-1", tags="mine")
    text, tags = _card(tmp_path)
    assert "mine" in tags
    if loss == "tm":
        assert {"gere", "continual-learning"} <= set(tags) and METHOD in text and GERE_BIBTEX in text
        trainer.create_model_card(model_name="stage-1")  # a second card (push_to_hub writes one each time)
        assert open(tmp_path / "README.md", encoding="utf-8").read().count("Cite GeRe as:") == 1
    else:
        assert "gere" not in tags and "2508.04676" not in text
