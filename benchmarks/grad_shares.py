# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""How much of each training step's update the task part, the replay CE and the replay term make (issue 22 §3).

Trains the benchmark's setting (recipes/benchmark_cpu.yaml: SmolLM2-135M-Instruct, LoRA r 8, the first task, lr 2e-3,
batch 8, 2 replay texts per step) with GeReTrainer and, every ``--every`` steps, takes the step loss apart
(``StepLoss.parts``: (1 − s)·task CE, s·replay CE, the weighted replay term) and computes each part's gradient
separately (``torch.autograd.grad``, so nothing of this touches the training path). Printed per diagnosed step: each
part's gradient norm, the norm of their sum, the clipping factor ``max_grad_norm`` applies, and each part's share of
the clipped update (its projection on the update direction, ⟨g_part, g⟩ / ‖g‖², which sums to 1 over the parts).

    python benchmarks/grad_shares.py --loss tm --weight dy --steps 40 --every 5 --json benchmarks/results/grad_shares_dy.json
    python benchmarks/grad_shares.py --model tiny --steps 6 --every 2            # a quick check on the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or tiny")
    p.add_argument("--task", default="arithmetic", help="a built-in task")
    p.add_argument("--loss", default="tm")
    p.add_argument("--weight", default="dy")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--replay-samples", type=int, default=200)
    p.add_argument("--replay-per-step", type=int, default=2)
    p.add_argument("--replay-max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import tempfile

    from peft import LoraConfig
    from transformers import ByT5Tokenizer
    from trl import SFTConfig

    from gere_hf import GeReConfig, GeReSFTTrainer, load_builtin_task
    from gere_hf.models import load_model_and_tokenizer, tiny_llama

    torch.manual_seed(a.seed)
    if a.model == "tiny":
        model, tok = tiny_llama(hidden_size=64, seed=a.seed), ByT5Tokenizer()
    else:
        model, tok = load_model_and_tokenizer(a.model)
    task = load_builtin_task(a.task, a.batch_size * a.steps, 10, seed=a.seed)
    records: list[dict] = []

    class Diagnosed(GeReSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            step = self.state.global_step
            if model.training and step % a.every == 0 and (not records or records[-1]["step"] != step):
                params = [q for q in model.parameters() if q.requires_grad]
                parts = self.gere_last_step_loss.parts
                grads = {}
                for name, part in parts.items():
                    g = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
                    grads[name] = torch.cat([(x if x is not None else torch.zeros_like(q)).reshape(-1)
                                             for x, q in zip(g, params)])
                whole = sum(grads.values())
                norm = float(whole.norm())
                clip = min(1.0, a.max_grad_norm / (norm + 1e-6)) if a.max_grad_norm > 0 else 1.0
                records.append({
                    "step": step, "grad_norm": norm, "clip_factor": clip,
                    "part_norms": {k: float(v.norm()) for k, v in grads.items()},
                    "update_shares": {k: float(v @ whole) / max(norm**2, 1e-30) for k, v in grads.items()},
                    "replay_term": float(self.gere_last_step_loss.replay_term or 0.0),
                    "replay_weight": float(self.gere_last_step_loss.replay_weight or 0.0),
                })
                r = records[-1]
                print(f"step {step:3d}: ‖g‖ {norm:9.3f} (clip ×{clip:.4f}); "
                      + ", ".join(f"{k} ‖g‖ {r['part_norms'][k]:9.3f} share {r['update_shares'][k]:+.3f}"
                                  for k in grads) + f"; w {r['replay_weight']:.1f}", flush=True)
            return total

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(tmp, per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=a.learning_rate,
                         lr_scheduler_type="constant", max_grad_norm=a.max_grad_norm, logging_steps=a.steps,
                         report_to=[], save_strategy="no", seed=a.seed, use_cpu=not torch.cuda.is_available(),
                         bf16=False, disable_tqdm=True, activation_checkpointing=False, max_length=128)
        trainer = Diagnosed(
            model=model, args=args, train_dataset=task.train, processing_class=tok,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]),
            gere_config=GeReConfig(loss=a.loss, weight=a.weight, replay_num_samples=a.replay_samples,
                                   replay_max_length=a.replay_max_length, replay_per_step=a.replay_per_step,
                                   store_dir=os.path.join(tmp, "store")),
        )
        trainer.train()
    later = [r for r in records if r["replay_term"] > 0] or records
    summary = {k: statistics.fmean(r["update_shares"][k] for r in later) for k in later[0]["update_shares"]}
    print("mean share of the clipped update once the term is non-zero: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in summary.items())
          + f"; mean clip factor {statistics.fmean(r['clip_factor'] for r in later):.4f}")
    result = {"settings": vars(a), "records": records, "mean_update_shares_after_first_violation": summary}
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
