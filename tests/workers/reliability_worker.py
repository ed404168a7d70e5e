"""Run by torchrun from tests/test_reliability.py: a 2-process GeReTrainer run (gloo, CPU) in which one rank fails.

Usage: reliability_worker.py CONFIG.json  (keys: out, store, fail_rank, fail_step, steps). Every rank writes
``pid-rank{R}.json`` at start; the failing rank writes ``failed-rank{R}.json`` (with the time) and raises at the
start of optimizer step ``fail_step + 1``; a rank that finishes writes ``finished-rank{R}.json``.
"""

import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

from gere_hf import GeReConfig, GeReTrainer, ReferenceStates
from gere_hf.models import tiny_llama


class FailOnRank(TrainerCallback):
    def __init__(self, out, rank, step):
        self.out, self.rank, self.step = out, rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step == self.step:
            with open(os.path.join(self.out, f"failed-rank{self.rank}.json"), "w") as f:
                json.dump({"time": time.time(), "step": state.global_step + 1}, f)
            raise RuntimeError(f"injected failure on rank {self.rank} at step {state.global_step + 1}")


def main(path):
    cfg = json.load(open(path))
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(cfg["out"], f"pid-rank{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid()}, f)
    tok = ByT5Tokenizer()
    ds = Dataset.from_dict({"text": [f"Q: {i} plus {i}? A: {2 * i}." for i in range(256)]})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(
        os.path.join(cfg["out"], "train"), per_device_train_batch_size=2, max_steps=cfg["steps"], logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-3,
        ddp_backend="gloo", **cfg.get("training", {}),
    )
    trainer = GeReTrainer(
        model=tiny_llama(hidden_size=32, seed=0, attn_implementation="eager"), args=args, train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
        reference_states=ReferenceStates.open(cfg["store"]), gere_config=GeReConfig(loss="tm", replay_per_step=2),
        callbacks=[FailOnRank(cfg["out"], cfg["fail_rank"], cfg["fail_step"])],
    )
    trainer.train()
    with open(os.path.join(cfg["out"], f"finished-rank{rank}.json"), "w") as f:
        json.dump({"time": time.time()}, f)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1]))
