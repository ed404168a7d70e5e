"""One task, LoRA, high learning rate: how far does held-out general-text NLL drift from the base model, per loss?

SmolLM2-135M-Instruct is fine-tuned on one built-in task with GeReSFTTrainer, once per replay loss (same seed,
same data, same LoRA init); before and after, the NLL of held-out Wikipedia summaries (the replay domain, never
replayed) and of news articles (outside the replay domain) is measured, plus the task's accuracy. The reference store
is built once (by the first replay loss) and shared. One JSON record per invocation is appended to
results/drift_single_task.json.

    python benchmarks/experiments/drift_single_task.py --task polarity --steps 30 --lr 2e-3 --losses none,ce,tm
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, machine, measure_general  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="polarity")
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-eval", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--losses", default="none,ce,tm")
    p.add_argument("--replay-n", type=int, default=64)
    p.add_argument("--replay-len", type=int, default=64)
    p.add_argument("--per-step", type=int, default=2)
    p.add_argument("--weight", default="dy")
    p.add_argument("--k", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--targets", default="all", help="'all' linear layers or a comma list")
    p.add_argument("--general-n", type=int, default=32)
    p.add_argument("--general-len", type=int, default=64)
    p.add_argument("--no-eval", action="store_true", help="Skip the task accuracy.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="drift_single_task")
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    from gere_hf import GeReConfig, GeReSFTTrainer
    from gere_hf.evaluation import evaluate_task
    from gere_hf.evaluation.tasks import load_builtin_task
    from gere_hf.models import load_model_and_tokenizer

    targets = ALL_LINEAR if args.targets == "all" else args.targets.split(",")
    base, tok = load_model_and_tokenizer("smollm2-135m")
    base.eval()
    task = load_builtin_task(args.task, args.num_train, args.num_eval, seed=args.seed)
    t0 = time.time()
    before = measure_general(base, tok, n=args.general_n, max_length=args.general_len)
    acc_before = None if args.no_eval else evaluate_task(base, tok, task, progress=False)
    record = {"settings": vars(args), "machine": machine(), "before": {**before, "accuracy": acc_before},
              "eval_seconds": round(time.time() - t0, 1), "runs": {}}
    print(f"before: {before} acc={acc_before}", flush=True)
    store_dir = tempfile.mkdtemp(prefix="gere_drift_store_")
    for loss in args.losses.split(","):
        model = get_peft_model(copy.deepcopy(base),
                               LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                          target_modules=targets, task_type="CAUSAL_LM"))
        torch.manual_seed(args.seed)
        out = tempfile.mkdtemp(prefix=f"gere_drift_{loss}_")
        sft = SFTConfig(out, max_steps=args.steps, per_device_train_batch_size=args.bs, learning_rate=args.lr,
                        lr_scheduler_type="constant", warmup_steps=0, seed=args.seed, bf16=False, use_cpu=True,
                        report_to=[], save_strategy="no", logging_steps=max(1, args.steps // 5), disable_tqdm=True,
                        max_length=256, dataloader_num_workers=0)
        cfg = GeReConfig(loss=loss, weight=args.weight, threshold_k=args.k, replay_num_samples=args.replay_n,
                         replay_max_length=args.replay_len, replay_per_step=args.per_step, store_dir=store_dir,
                         replay_seed=args.seed)
        trainer = GeReSFTTrainer(model=model, args=sft, train_dataset=task.train, processing_class=tok,
                                 gere_config=cfg)
        t = time.time()
        trainer.train()
        seconds = time.time() - t
        model.eval()
        after = measure_general(model, tok, n=args.general_n, max_length=args.general_len)
        acc = None if args.no_eval else evaluate_task(model, tok, task, progress=False)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        run = {"train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / args.steps, 2),
               "after": {**after, "accuracy": acc},
               "drift": {k: round(after[k] - before[k], 4) for k in after},
               "log": [{k: h.get(k) for k in ("step", "loss", "task_loss", "replay_ce", "replay_term",
                                               "replay_weight")} for h in logs]}
        record["runs"][loss] = run
        print(f"{loss}: drift {run['drift']} acc={acc} ({seconds:.0f} s, {run['seconds_per_step']} s/step)",
              flush=True)
        del trainer, model
    record["total_seconds"] = round(time.time() - t0, 1)
    path = append_result(args.name, record)
    print(f"appended to {path}")
    return record


if __name__ == "__main__":
    main()
