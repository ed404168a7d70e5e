"""Training-step cost of GeRe: TM vs vanilla replay (CE) vs the replay texts given as plain training data.

Every mode trains on the same task batches and the same replay samples per optimizer step, with the same seed:

- ``tm``:    GeReTrainer(loss="tm")  (replay CE + threshold margin; labels from the 2-bit store)
- ``ce``:    GeReTrainer(loss="ce")  (vanilla replay)
- ``plain``: transformers.Trainer on the same tokens with no GeRe machinery: each batch is the task rows plus the
             step's replay rows, collated together (what a user does by concatenating replay texts into the data)

Each mode runs in its own process so peak memory (CPU: max RSS; GPU: torch.cuda.max_memory_allocated) is its own.
Reports seconds per optimizer step (mean over the same steps after warm-up), tokens/s, peak memory, and the replay data path (store
reads + packing) as a share of the step. Targets (issue 6): TM within 5% of CE in time and memory; CE within 5% of
plain; replay data path ≤ 2% of the step.

    python benchmarks/bench_step.py --model tiny --steps 30
    python benchmarks/bench_step.py --model smollm2-135m --steps 20 --batch-size 4 --replay-per-step 2 --repeats 3
    python benchmarks/bench_step.py --model llama-1b-shape --device cuda --dtype bf16 --batch-size 8 --seq-len 563
    python benchmarks/bench_step.py --model llama-1b-shape --device cuda --dtype bf16 --peft 16   # LoRA
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import bench_model  # noqa: E402

MODES = ("plain", "ce", "tm")
PEAK_TFLOPS = {"cuda": 989.4}  # dense bf16 of an H100/H200 SXM (datasheet); MFU is also given against --ceiling


def model_flops(model, lengths: list[int]) -> float:
    """Model FLOPs of one training step over samples of these token counts (real tokens, padding not counted).

    Matrix products: 6 FLOPs per weight and token for trained weights (forward, input and weight gradients), 4 for
    frozen ones (no weight gradient: LoRA's base), the LM head included. Causal attention: QKᵀ and AV over the
    earlier positions, 2·t²·d forward per layer and sample, ×3 with the backward.
    """
    import torch

    weights = trained = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weights += module.weight.numel()
            trained += module.weight.numel() if module.weight.requires_grad else 0
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    tokens = sum(lengths)
    return 6 * trained * tokens + 4 * (weights - trained) * tokens + 6 * layers * hidden * sum(t * t for t in lengths)


def _task_dataset(tokenizer, n: int, seq_len: int):
    from datasets import Dataset

    from gere_hf.evaluation.tasks import load_builtin_task

    try:
        rows = load_builtin_task("polarity", num_train=min(n, 150), num_eval=10).train
        texts = [p + c for p, c in zip(rows["prompt"], rows["completion"])]
    except Exception:  # the demo extra is not installed: synthetic task text of similar length
        texts = [f"Review: a film about number {i}, neither good nor bad.\nSentiment: neutral" for i in range(n)]
    texts = (texts * (n // len(texts) + 1))[:n]
    ds = Dataset.from_dict({"text": texts})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True,
                  remove_columns=["text"])


def run_mode(a) -> dict:
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from gere_hf import GeReConfig, GeReTrainer, ReferenceStates, ReplaySet
    from gere_hf.schedule import ReplaySchedule

    model, tok = bench_model(a.model, a.dtype, a.device)
    replay = ReplaySet.load(tok, "wiki", a.replay_samples, a.seq_len, allow_fewer=True)
    store = ReferenceStates.build(model, replay, a.store, batch_size=a.batch_size, progress=False)
    if a.peft:  # LoRA on every linear layer of the decoder, the paper's LoRA setting
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a.peft, lora_alpha=2 * a.peft, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    train = _task_dataset(tok, a.batch_size * (a.steps + 2), a.seq_len)
    # Task batches padded to a multiple of N: fewer distinct shapes (on a GPU each new sequence length costs cuDNN's
    # attention a new plan: docs/lab/benchmarks.md, "The GPU check").
    collator = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=a.pad_to_multiple_of or None)

    times: list[float] = []
    prof = None
    if a.profile:  # torch.profiler over `profile` optimizer steps after the warm-up ones
        activities = [torch.profiler.ProfilerActivity.CPU]
        if a.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities,
                                      schedule=torch.profiler.schedule(wait=a.warmup, warmup=1, active=a.profile))

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if prof is not None:
                prof.step()

    args = TrainingArguments(
        a.out, per_device_train_batch_size=a.batch_size, max_steps=a.steps, logging_steps=a.steps, report_to=[],
        save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-5, use_cpu=a.device == "cpu",
        bf16=a.dtype == "bf16" and a.device == "cuda", dataloader_num_workers=0,
    )
    schedule = ReplaySchedule(len(store), per_step=a.replay_per_step, seed=0)
    if a.mode == "plain":
        step_counter = {"n": 0}

        def plain_collator(features):
            step = step_counter["n"]
            step_counter["n"] += 1
            extra = [{"input_ids": store.input_ids(i).tolist()} for i in schedule.indices(step, 0, 0)]
            return collator([{"input_ids": f["input_ids"]} for f in features] + extra)

        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=plain_collator,
                          processing_class=tok, callbacks=[Timer()])
    else:
        trainer = GeReTrainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tok,
                              callbacks=[Timer()], reference_states=store,
                              gere_config=GeReConfig(loss=a.mode, replay_per_step=a.replay_per_step))
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if prof is not None:
        with prof:
            trainer.train()
    else:
        trainer.train()
    warm = times[a.warmup:] or times
    # The mean, not the median: every mode sees the same batches, whose lengths (and so step times) vary by up to 3×;
    # the median of such a bimodal sample jumps between clusters on small shifts, the mean of the same steps does not.
    step_s = statistics.fmean(warm)
    task_lengths = [len(x) for x in train["input_ids"][: a.batch_size * a.steps]]
    replay_lengths = [int(store.lengths[i]) for s in range(a.steps) for i in schedule.indices(s, 0, 0)]
    task_tokens, replay_tokens = sum(task_lengths) / a.steps, sum(replay_lengths) / a.steps
    flops_per_step = model_flops(model, task_lengths + replay_lengths) / a.steps
    peak = (torch.cuda.max_memory_allocated() if a.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    data_s = getattr(trainer, "gere_data_seconds", 0.0) / max(len(times), 1)
    return {
        "mode": a.mode, "step_seconds": step_s, "tokens_per_second": (task_tokens + replay_tokens) / step_s,
        "model_flops_per_step": flops_per_step, "peak_memory_bytes": int(peak), "replay_data_seconds_per_step": data_s,
        "replay_data_share": data_s / step_s if a.mode != "plain" else None,
        "steps_timed": len(warm), "step_times": [round(t, 4) for t in warm],
        "profile": profile_summary(prof, a.profile, times[a.warmup + 1 : a.warmup + 1 + a.profile]) if prof else None,
    }


# Host-side calls that stall a GPU step: allocator traffic (a cache miss frees and maps device memory) and
# synchronisations (a .item(), a host copy, a bool() of a device tensor).
_STALLS = ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
           "aten::_local_scalar_dense", "aten::item")


def profile_summary(prof, steps: int, step_seconds: list[float]) -> dict:
    """Per profiled step: the device's busy time (sum of kernel time), the top operators by device and host time,
    and the host calls that stall the device (counts and host milliseconds)."""
    import torch

    events = prof.key_averages()
    # Kernels (and device copies) are their own events on the device: their self time is the device's busy time.
    device = {e.key: e.self_device_time_total / 1e3 / steps for e in events
              if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA}
    host = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    host.pop("ProfilerStep*", None)
    stalls = {e.key: {"count_per_step": e.count / steps, "host_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
              for e in events if e.key in _STALLS}
    step_ms = 1e3 * sum(step_seconds) / max(len(step_seconds), 1)
    return {
        "steps": steps, "step_ms": step_ms, "device_busy_ms": sum(device.values()),
        "top_device_ms": dict(sorted(device.items(), key=lambda kv: -kv[1])[:12]),
        "top_host_ms": dict(sorted(host.items(), key=lambda kv: -kv[1])[:12]),
        "stalls": stalls,
    }


def _merge_repeats(runs: list[dict]) -> dict:
    """One mode over its repeats: mean step time over all timed steps, the largest peak memory."""
    times = [t for r in runs for t in r["step_times"]]
    step_s = statistics.fmean(times)
    data_s = statistics.fmean(r["replay_data_seconds_per_step"] for r in runs)
    tokens = statistics.fmean(r["tokens_per_second"] * r["step_seconds"] for r in runs)
    return {
        "mode": runs[0]["mode"], "step_seconds": step_s, "tokens_per_second": tokens / step_s,
        "model_tflops": runs[0]["model_flops_per_step"] / step_s / 1e12, "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs), "replay_data_seconds_per_step": data_s,
        "replay_data_share": data_s / step_s if runs[0]["replay_data_share"] is not None else None,
        "steps_timed": len(times), "step_times": times, "repeat_step_seconds": [r["step_seconds"] for r in runs],
        "profiles": [r.get("profile") for r in runs],
    }


def _paired_ratio(r: dict, ref: dict) -> float:
    return statistics.median(a / b for a, b in zip(r["step_times"], ref["step_times"]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--replay-per-step", type=int, default=4)
    p.add_argument("--replay-samples", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=563)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--pad-to-multiple-of", type=int, default=0, help="pad task batches to a multiple of this (0: no)")
    p.add_argument("--peft", type=int, default=0, help="LoRA rank on every decoder linear layer (0: full fine-tuning)")
    p.add_argument("--repeats", type=int, default=1, help="Run every mode this many times, in turn; times averaged.")
    p.add_argument("--profile", type=int, default=0,
                   help="Profile this many steps after the warm-up (torch.profiler, CUDA too on a GPU): device busy "
                        "time, top operators, allocator calls and synchronisations per step")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense rate for MFU (default: 989.4 bf16 on CUDA, the H100/H200 SXM datasheet)")
    p.add_argument("--ceiling", default=None, help="device_ceiling.py's JSON: MFU against the measured matrix rate too")
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:  # child process
        print("RESULT " + json.dumps(run_mode(a)))
        return
    modes = a.modes.split(",")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        # Round robin: a slow phase of the machine then hits every mode alike instead of one mode's whole run.
        for repeat in range(a.repeats):
            for mode in modes:
                cmd = [sys.executable, __file__, "--mode", mode, "--store", store,
                       "--out", os.path.join(tmp, f"{mode}_{repeat}")]
                for key in ("model", "device", "dtype", "steps", "warmup", "batch_size", "replay_per_step",
                            "replay_samples", "seq_len", "peft", "profile", "pad_to_multiple_of"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
                runs[mode].append(json.loads(line[-1][7:]))
                print(f"repeat {repeat + 1}/{a.repeats} {mode}: {runs[mode][-1]['step_seconds']:.3f} s/step",
                      file=sys.stderr, flush=True)
    results = [_merge_repeats(runs[mode]) for mode in modes]
    by = {r["mode"]: r for r in results}
    peak = a.peak_tflops or PEAK_TFLOPS.get(a.device.split(":")[0])
    measured = None
    if a.ceiling and os.path.isfile(a.ceiling):
        with open(a.ceiling, encoding="utf-8") as f:
            measured = json.load(f)["matmul_tflops"]
    for r in results:
        r["mfu"] = r["model_tflops"] / peak if peak else None
        r["mfu_vs_measured_matmul"] = r["model_tflops"] / measured if measured else None
    print(f"\nmodel={a.model}{f' LoRA r={a.peft}' if a.peft else ' full fine-tuning'} device={a.device} "
          f"dtype={a.dtype} batch={a.batch_size} seq_len≤{a.seq_len} "
          f"replay/step={a.replay_per_step} steps={a.steps} repeats={a.repeats}"
          + (f" task batches padded to a multiple of {a.pad_to_multiple_of}" if a.pad_to_multiple_of else ""))
    print("| mode | s/step | tokens/s | model TFLOP/s | MFU | peak memory (MiB) | replay data share | time vs ce "
          "| step by step vs ce | memory vs ce |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ce = by.get("ce")
        tv = f"{r['step_seconds'] / ce['step_seconds']:.3f}×" if ce else "-"
        # The same step in both modes had the same batch: the median of the per-step ratios.
        pv = f"{_paired_ratio(r, ce):.3f}×" if ce else "-"
        mv = f"{r['peak_memory_bytes'] / ce['peak_memory_bytes']:.3f}×" if ce else "-"
        share = f"{100 * r['replay_data_share']:.2f}%" if r["replay_data_share"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        if r["mfu_vs_measured_matmul"] is not None:
            mfu += f" ({100 * r['mfu_vs_measured_matmul']:.1f}% of the measured matmul)"
        print(f"| {r['mode']} | {r['step_seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['model_tflops']:.2f} | "
              f"{mfu} | {r['peak_memory_bytes'] / 2**20:.0f} | {share} | {tv} | {pv} | {mv} |")
    if "ce" in by and a.repeats > 1:
        for r in results:
            ratios = [x / y for x, y in zip(r["repeat_step_seconds"], by["ce"]["repeat_step_seconds"])]
            print(f"{r['mode']} vs ce, each repeat: " + ", ".join(f"{x:.3f}×" for x in ratios))
    for r in results:
        for i, prof in enumerate(r["profiles"]):
            if prof is None:
                continue
            print(f"\nprofile of {r['mode']} (repeat {i + 1}), per step: {prof['step_ms']:.1f} ms wall, device busy "
                  f"{prof['device_busy_ms']:.1f} ms ({100 * prof['device_busy_ms'] / max(prof['step_ms'], 1e-9):.0f}%)")
            print("  stalls: " + (", ".join(f"{k} ×{v['count_per_step']:.1f} ({v['host_ms_per_step']:.1f} ms host)"
                                            for k, v in prof["stalls"].items()) or "none"))
            print("  top device ms: " + ", ".join(f"{k[:40]} {v:.1f}" for k, v in list(prof["top_device_ms"].items())[:8]))
            print("  top host ms: " + ", ".join(f"{k[:40]} {v:.1f}" for k, v in list(prof["top_host_ms"].items())[:8]))
    if "ce" in by and "plain" in by:
        print(f"ce vs plain: time {by['ce']['step_seconds'] / by['plain']['step_seconds']:.3f}× "
              f"(step by step {_paired_ratio(by['ce'], by['plain']):.3f}×), memory "
              f"{by['ce']['peak_memory_bytes'] / by['plain']['peak_memory_bytes']:.3f}×")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(a).items() if k not in ("mode", "store", "out")},
                       "peak_tflops": peak, "measured_matmul_tflops": measured,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
