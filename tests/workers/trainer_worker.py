"""Run by torchrun from tests/test_trainer_distributed.py: one GeReTrainer run, its logs and replay mix to JSON.

Usage: trainer_worker.py CONFIG.json  (keys: out, store, mode in {single, ddp, zero2, zero3}, peft, loss, bs, ga,
steps, replay_per_step, replay_share, weight; tasks: a list of task texts instead of the default 64; perturb: the
final norm scaled by 1.5, so that TM is non-zero from the first step; grads: save the first step's gradients, before
clipping, to grads.pt)
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

from gere_hf import GeReConfig, GeReTrainer, ReferenceStates
from gere_hf.models import tiny_llama


def main(path):
    cfg = json.load(open(path))
    if cfg["mode"].startswith("zero"):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 2-minute op build on CPU
    tok = ByT5Tokenizer()
    texts = cfg.get("tasks") or [f"Q: {i} plus {i}? A: {2 * i}." for i in range(64)]
    ds = Dataset.from_dict({"text": texts})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    ds_config = None
    if cfg["mode"].startswith("zero"):
        ds_config = {
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": int(cfg["mode"][-1])}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False}, "fp16": {"enabled": False},
        }
    args = TrainingArguments(
        cfg["out"], per_device_train_batch_size=cfg["bs"], gradient_accumulation_steps=cfg["ga"],
        max_steps=cfg["steps"], logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, learning_rate=1e-3, ddp_backend="gloo" if cfg["mode"] != "single" else None,
        deepspeed=ds_config, max_grad_norm=0.0 if cfg.get("grads") else 1.0,
    )
    model = tiny_llama(hidden_size=32, seed=0, attn_implementation="eager")
    if cfg.get("perturb"):
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
    if cfg["peft"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    store = ReferenceStates.open(cfg["store"])
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok, reference_states=store,
        gere_config=GeReConfig(loss=cfg["loss"], replay_per_step=cfg.get("replay_per_step"),
                               replay_share=cfg.get("replay_share", "samples"), weight=cfg.get("weight", "dy")),
    )
    if cfg.get("grads"):
        trainer.add_callback(FirstGrads(os.path.join(cfg["out"], "grads.pt")))
    trainer.train()
    rank = trainer.args.process_index
    result = {
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "mix": trainer.mix,
        "max_steps": trainer.state.max_steps,
        "precision": trainer.gere_training_precision(),
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "lr_scheduler_steps": trainer.lr_scheduler.state_dict().get("last_epoch"),
        "files_written": sorted(os.listdir(cfg["out"])) if rank == 0 else None,
    }
    with open(os.path.join(cfg["out"], f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


class FirstGrads(TrainerCallback):
    """Saves the first optimizer step's gradients (rank 0; DDP has averaged them)."""

    def __init__(self, path):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step == 0 and args.process_index == 0:
            torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                       self.path)


class RecordingTrainer(GeReTrainer):
    """Records which replay samples each micro-batch carried (the collator ships their indices)."""

    mix: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.__dict__.setdefault("mix", [])
            got = inputs.get("gere_indices")
            self.mix.append({"step": self.state.global_step, "rank": self.args.process_index,
                             "indices": got.tolist() if got is not None else []})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1]))
