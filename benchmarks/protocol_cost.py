# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""What GeRe adds to plain continual SFT over the paper's whole protocol: an estimate from token counts, printed as
a table. Every input is a flag; the defaults are the paper recipe (recipes/paper_llama31_8b_lora.yaml) and
assumptions stated in docs/lab/benchmarks.md. Nothing here is measured on a GPU.

    python benchmarks/protocol_cost.py
    python benchmarks/protocol_cost.py --replay-per-step 4 --global-batch 64     # the paper's batch interpolation
    python benchmarks/protocol_cost.py --replay-max-length 256 --replay-per-step 1

Model of the cost: compute is counted in units of N = the model's parameters, per token: a forward costs 2N
(``--forward-factor``), a LoRA training token with activation checkpointing 6N (forward, its recomputation, the
backward's input gradients; frozen weights get no weight gradients; ``--train-factor``). Replay tokens train like
task tokens (CE + TM through the same forward and backward); the store build is one forward over the replay tokens
(``--build-forwards``: 1 when its states stay on the device, 2 when they do not fit); the general-retention rows are a
forward over the held-out texts after every stage and before the first; TM's own work and the replay data path are
measured fractions of a step (docs/lab/benchmarks.md, section 2 and 3). The accuracy matrix (every task's test set in
every row) is part of the protocol with or without GeRe. ``--tflops`` turns the units into H200-hours (an assumed
sustained throughput, not a measurement).

``--measured RESULTS.json`` (what benchmarks/gpu.sh brings back from a GPU) replaces the assumptions by what that run
measured: the throughput (model TFLOP/s of the plain LoRA step), TM's own share (TM ÷ CE step, step by step, minus 1),
the replay data path's share, the store build's forwards (1 ÷ its ratio to the bare forward), and a part the token
count cannot see: the step layout, CE ÷ plain on the same tokens minus 1 (replay in its own forward, task batches at
their own lengths), applied to every trained token. "Beyond its replay tokens" is everything GeRe adds except the
replay tokens' own training compute (target ≤ 2 % of the run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

# O-LoRA's long sequence as the paper recipe describes it: about 1,000 training and 500 test examples per class
# (CB and COPA have fewer in their sources). Classes per task, in the recipe's order.
TASKS = {"mnli": 3, "cb": 3, "wic": 2, "copa": 2, "qqp": 2, "boolq": 2, "rte": 2, "imdb": 2, "yelp": 5, "amazon": 5,
         "sst2": 2, "dbpedia": 14, "agnews": 4, "multirc": 2, "yahoo": 10}
SMALL = {"cb": (250, 56), "copa": (400, 100)}  # (train, test) where the source has fewer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=8.03e9, help="Llama-3.1-8B")
    p.add_argument("--task-tokens", type=float, default=160, help="mean tokens of a task example (prompt + answer)")
    p.add_argument("--eval-prompt-tokens", type=float, default=150, help="mean prompt tokens of a test example")
    p.add_argument("--eval-new-tokens", type=int, default=8, help="evaluation.max_new_tokens")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--global-batch", type=int, default=32, help="task samples per optimizer step (8 GPUs x 4)")
    p.add_argument("--replay-samples", type=int, default=1000)
    p.add_argument("--replay-max-length", type=int, default=563)
    p.add_argument("--replay-mean-tokens", type=float, default=None,
                   help="mean replay length (default: max length; SlimPajama documents are longer than 563 tokens)")
    p.add_argument("--replay-per-step", type=float, default=None,
                   help="replay samples per optimizer step (default: each replay sample once per stage epoch)")
    p.add_argument("--general-texts", type=int, default=200)
    p.add_argument("--general-max-length", type=int, default=563)
    p.add_argument("--build-forwards", type=float, default=1.0)
    p.add_argument("--train-factor", type=float, default=6.0)
    p.add_argument("--forward-factor", type=float, default=2.0)
    p.add_argument("--tm-share", type=float, default=0.0013, help="TM's own work per step, measured (SmolLM2, CPU)")
    p.add_argument("--data-share", type=float, default=0.0037, help="replay data path per step, measured (tiny, CPU)")
    p.add_argument("--tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOP/s of one H200")
    p.add_argument("--layout-overhead", type=float, default=0.0,
                   help="CE step ÷ plain step on the same tokens, minus 1 (measured on a GPU: --measured)")
    p.add_argument("--measured", default=None, help="results.json of benchmarks/gpu.sh: measured inputs (docstring)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.measured:
        measured_inputs(a)

    train_examples = sum(SMALL.get(t, (1000 * c, 0))[0] for t, c in TASKS.items())
    test_examples = sum(SMALL.get(t, (0, 500 * c))[1] for t, c in TASKS.items())
    stages, rows = len(TASKS), len(TASKS) + 1
    steps = sum(math.ceil(a.epochs * SMALL.get(t, (1000 * c, 0))[0] / a.global_batch) for t, c in TASKS.items())
    replay_len = a.replay_mean_tokens or a.replay_max_length
    task_tokens = a.epochs * train_examples * a.task_tokens
    if a.replay_per_step is None:  # each replay sample once per epoch of every stage
        replay_trained = stages * math.ceil(a.epochs) * a.replay_samples * replay_len
        replay_rule = f"each of the {a.replay_samples} samples once per stage epoch"
    else:
        replay_trained = steps * a.replay_per_step * replay_len
        replay_rule = f"{a.replay_per_step:g} per optimizer step of {a.global_batch} task samples"
    n = a.params
    plain_train = task_tokens * a.train_factor * n
    accuracy_matrix = rows * test_examples * (a.eval_prompt_tokens + a.eval_new_tokens) * a.forward_factor * n
    parts = {
        "store build (once)": a.build_forwards * a.replay_samples * replay_len * a.forward_factor * n,
        f"replay trained ({replay_rule})": replay_trained * a.train_factor * n,
        "TM's own work": a.tm_share * (plain_train + replay_trained * a.train_factor * n),
        "replay data path": a.data_share * (plain_train + replay_trained * a.train_factor * n),
        "general-retention rows": rows * a.general_texts * a.general_max_length * a.forward_factor * n,
        "step layout (measured)": a.layout_overhead * (plain_train + replay_trained * a.train_factor * n),
    }
    added = sum(parts.values())
    run = plain_train + accuracy_matrix

    def hours(flop):
        return flop / (a.tflops * 1e12) / 3600

    print(f"\nThe paper's protocol, {stages} stages, {train_examples:,} training and {test_examples:,} test examples, "
          f"{steps:,} optimizer steps; {a.params / 1e9:.2f}B parameters (estimate, see the docstring)")
    print("| part | tokens | compute (N·tokens) | share of plain training | share of the plain run | H200-hours |")
    print("|---|---|---|---|---|---|")
    rows_out = [("plain SFT training", task_tokens, plain_train), ("accuracy matrix (protocol)", None, accuracy_matrix)]
    for name, tokens, flop in rows_out:
        print(f"| {name} | {tokens or rows * test_examples * (a.eval_prompt_tokens + a.eval_new_tokens):,.0f} | "
              f"{flop / n:,.3g} | {flop / plain_train:.1%} | {flop / run:.1%} | {hours(flop):.2f} |")
    for name, flop in parts.items():
        print(f"| GeRe: {name} | | {flop / n:,.3g} | {flop / plain_train:.2%} | {flop / run:.2%} | {hours(flop):.2f} |")
    print(f"| **GeRe in all** | | {added / n:,.3g} | **{added / plain_train:.1%}** | **{added / run:.1%}** | "
          f"{hours(added):.2f} |")
    dominant = max(parts, key=parts.get)
    beyond = added - parts[f"replay trained ({replay_rule})"]
    print(f"largest part: {dominant} ({parts[dominant] / added:.0%} of what GeRe adds); target: ≤ 5 % of the run")
    print(f"beyond its replay tokens GeRe adds {beyond / run:.2%} of the run ({beyond / plain_train:.2%} of the "
          f"training); target ≤ 2 %")
    result = {"settings": vars(a), "train_examples": train_examples, "test_examples": test_examples, "steps": steps,
              "plain_training_flop": plain_train, "accuracy_matrix_flop": accuracy_matrix, "parts_flop": parts,
              "added_share_of_training": added / plain_train, "added_share_of_run": added / run,
              "beyond_replay_share_of_run": beyond / run, "dominant": dominant}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def _paired(results: list[dict], mode: str, ref: str) -> float:
    """Median over steps of mode's step time ÷ ref's (every mode trains the same batches in the same order)."""
    by = {r["mode"]: r["step_times"] for r in results}
    return statistics.median(x / y for x, y in zip(by[mode], by[ref]))


def measured_inputs(a) -> None:
    """Set the estimate's inputs from a gpu.sh results.json, and say which."""
    with open(a.measured, encoding="utf-8") as f:
        r = json.load(f)
    step = r.get("step_lora") or r["step_full"]
    by = {x["mode"]: x for x in step["results"]}
    a.tflops = by["plain"]["model_tflops"]
    a.tm_share = max(_paired(step["results"], "tm", "ce") - 1.0, 0.0)
    a.data_share = by["ce"]["replay_data_share"]
    a.layout_overhead = max(_paired(step["results"], "ce", "plain") - 1.0, 0.0)
    if "store" in r:
        a.build_forwards = 1.0 / r["store"]["main"]["build_to_limit_ratio"]
    print(f"measured ({a.measured}): plain LoRA step {a.tflops:.1f} model TFLOP/s; TM own {a.tm_share:.2%}; data path "
          f"{a.data_share:.2%}; step layout +{a.layout_overhead:.1%}; store build {a.build_forwards:.2f} forwards")


if __name__ == "__main__":
    main()
