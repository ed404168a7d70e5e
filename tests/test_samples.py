"""gere_hf.samples: the samples of every batch layout TRL and transformers produce, built by their own collators."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_trainer import TOK, _model, _sft_dataset
from transformers import DataCollatorForLanguageModeling as HFCollator
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

from gere_hf import GeReConfig, GeReSFTTrainer
from gere_hf.samples import count_samples, count_targets, per_sample_sums, sample_ids

SEQS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _features(seqs=SEQS):
    return [{"input_ids": s} for s in seqs]


def test_padded_rows_are_one_sample_each():
    batch = HFCollator(TOK, mlm=False)(_features())
    ids, n = sample_ids(batch)
    assert n == 3 and count_samples(batch) == 3
    assert ids.tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2]]
    assert count_targets(batch) == 2 + 1 + 3


@pytest.mark.parametrize("multiple", [None, 16, 64])
def test_padding_free_rows_count_their_sequences_not_their_padding(multiple):
    """TRL pads a padding-free row's position_ids with 0 (pad_to_multiple_of): 3 sequences once counted as 10 and 58
    samples; they are 3, and the padding belongs to none."""
    batch = TRLCollator(pad_token_id=0, padding_free=True, pad_to_multiple_of=multiple)(_features())
    assert "attention_mask" not in batch and batch["position_ids"].shape == (1, multiple or 9)
    ids, n = sample_ids(batch)
    assert n == 3
    assert ids[0, :9].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert (ids[0, 9:] == -1).all()
    assert count_targets(batch) == 2 + 1 + 3


def test_packed_bfd_rows_count_the_documents_they_hold():
    """TRL's bfd packing keeps each row's document lengths (seq_lengths); its collator turns them into position_ids
    that restart at every document."""
    features = [{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}, {"input_ids": [10, 11, 12, 13],
                                                                       "seq_lengths": [4]}]
    batch = TRLCollator(pad_token_id=0, padding_free=True)(features)
    ids, n = sample_ids(batch)
    assert n == 3 and ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_wrapped_blocks_and_pre_chunked_rows_are_one_sample_per_row():
    """Blocks cut from concatenated documents (TRL's 'wrapped' packing, or chunks made beforehand) carry no document
    boundaries: each row counts once."""
    batch = TRLCollator(pad_token_id=0, return_position_ids=True)(_features([[5, 6, 7, 8], [9, 10, 11, 12]]))
    assert "attention_mask" in batch and "position_ids" in batch
    assert sample_ids(batch)[1] == 2


def test_per_sample_sums_leave_padding_out_and_keep_gradients():
    values = torch.arange(8, dtype=torch.float32).view(2, 4).requires_grad_()
    ids = torch.tensor([[0, 0, 1, -1], [2, 2, 2, -1]])
    sums = per_sample_sums(values, ids, 3)
    assert sums.tolist() == [1.0, 2.0, 15.0]
    sums.sum().backward()
    assert values.grad.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]


def _sft_trainer(tmp_path, **sft):
    args = SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-3,
                     **sft)
    return GeReSFTTrainer(
        model=_model(), args=args, train_dataset=_sft_dataset(8), processing_class=TOK,
        gere_config=GeReConfig(loss="tm", replay_source=Dataset.from_dict({"text": [f"Replay {i}." * 3
                                                                                   for i in range(8)]}),
                               replay_num_samples=8, replay_max_length=32, replay_per_step=4,
                               store_dir=str(tmp_path / "store")),
    )


@pytest.mark.parametrize("layout", [{}, {"padding_free": True, "max_length": None},
                                    {"padding_free": True, "max_length": None, "pad_to_multiple_of": 64},
                                    {"packing": True, "packing_strategy": "bfd"}])
def test_sft_trainer_logs_the_share_of_the_real_samples(tmp_path, layout):
    """4 task and 4 replay samples in a step, whatever TRL's layout: replay_share 0.5 (with pad_to_multiple_of=64 it
    was logged and used as 0.0625 before: replay weighed 8× too little)."""
    if layout.get("packing"):
        layout = {**layout, "max_length": 4096}  # every example of the step packed into one row
    trainer = _sft_trainer(tmp_path, **layout)
    trainer.train()
    log = trainer.state.log_history[0]
    expected = 0.5 if not layout.get("packing") else 4 / (8 + 4)  # packing puts the 8 examples in one step
    assert log["replay_share"] == pytest.approx(expected)
    assert torch.isfinite(torch.tensor(log["loss"]))
