# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""A 2-stage continual recipe with a random model, for the device check (benchmarks/gpu.sh) and its CPU trial.

    python benchmarks/gpu_recipe.py --model llama-1b-shape --out /tmp/gpu_recipe --run --json recipe.json
    python benchmarks/gpu_recipe.py --model tiny --out /tmp/fsdp2_recipe           # writes recipe.yaml only
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 -m gere_hf run /tmp/fsdp2_recipe/recipe.yaml

Writes the random model (Llama-3.2-1B's shape, or the tiny test Llama, with the byte-level ByT5 tokenizer) as a
local checkpoint and a recipe for it: LoRA on every decoder linear layer continued over two built-in offline tasks
(polarity, trivia), GeRe with the threshold-margin loss, bf16 on a GPU. With --run the recipe runs in this process
and the wall time of each part (model save, stages, evaluation) is printed and written as JSON. Random weights: the
accuracies mean nothing; what is measured is that the pipeline runs and what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import bench_model  # noqa: E402


def write_recipe(args) -> str:
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "base_model")
    cuda = args.device == "cuda"
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        model, tokenizer = bench_model(args.model, "bf16" if cuda else "fp32", args.device, tiny_hidden=args.tiny_hidden)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    recipe = {
        "name": f"gpu_check_{args.model}",
        "output_dir": os.path.join(args.out, "run"),
        "overwrite_output_dir": True,
        "seed": 0,
        "model": {"name_or_path": model_dir, "dtype": "bfloat16" if cuda else "float32"},
        "peft": None if args.full else {
            "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "adapters": None if args.full else {"strategy": "continue"},
        "gere": {"loss": "tm", "weight": "dy", "replay_source": "wiki", "replay_num_samples": args.replay_samples,
                 "replay_max_length": 563, "store_batch_size": 16, "replay_per_step": 4},
        "training": {"per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
                     "learning_rate": 1.0e-4, "max_steps": args.steps, "max_length": 563, "logging_steps": 1,
                     "save_strategy": "no", "lr_scheduler_type": "constant", "dataloader_num_workers": 0,
                     "bf16": cuda},
        "evaluation": {"general_texts": 16, "general_max_length": 256, "batch_size": 16, "max_new_tokens": 8},
        "stages": [
            {"name": "polarity", "dataset": "polarity", "num_train": args.batch_size * args.steps, "num_eval": 16},
            {"name": "trivia", "dataset": "trivia", "num_train": args.batch_size * args.steps, "num_eval": 16},
        ],
    }
    path = os.path.join(args.out, "recipe.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b-shape", help="llama-1b-shape or tiny (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per stage")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--replay-samples", type=int, default=200)
    p.add_argument("--tiny-hidden", type=int, default=64)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--run", action="store_true", help="run the recipe here and time it")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    path = write_recipe(args)
    result = {"recipe": path, "setup_seconds": time.perf_counter() - t0}
    print(f"recipe: {path} ({result['setup_seconds']:.1f} s to write the model and the recipe)")
    if args.run:
        from gere_hf import run_recipe

        t0 = time.perf_counter()
        run_recipe(path)
        result["run_seconds"] = time.perf_counter() - t0
        with open(os.path.join(args.out, "run", "run_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        result["stages"] = [{k: s.get(k) for k in ("name", "status", "distributed_type", "train_seconds")}
                            | {"train_loss": (s.get("train") or {}).get("train_loss")} for s in state["stages"]]
        trained = sum(s["train_seconds"] or 0 for s in result["stages"])
        result["other_seconds"] = result["run_seconds"] - trained  # store, evaluation rows, saving, report
        print(f"2-stage recipe ({args.model}): {result['run_seconds']:.1f} s in all, training "
              + ", ".join(f"{s['name']} {s['train_seconds']:.1f} s" for s in result["stages"])
              + f"; the rest (store build, evaluation rows, saves, report) {result['other_seconds']:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
