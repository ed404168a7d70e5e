"""Where a GeRe training step spends its time: torch.profiler over the same steps under two replay losses.

Wall-clock step times on a shared or virtualised CPU move by ±10 % between identical runs (docs/lab/benchmarks.md), more
than the difference this script looks for. The operators' own CPU time is steadier: this script trains the same
batches and replay samples as ``bench_step.py`` under each mode, profiles ``--active`` optimizer steps after
``--wait`` steps, and prints per mode the total operator CPU time per step, the ratio to the first mode, and the
operators whose time differs most between the modes.

    python benchmarks/profile_step.py --model smollm2-135m --modes ce,tm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def profile_mode(a) -> dict:
    import torch
    from bench_models import bench_model
    from bench_step import _task_dataset
    from transformers import DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

    from gere_hf import GeReConfig, GeReTrainer, ReferenceStates, ReplaySet

    model, tok = bench_model(a.model, "fp32", "cpu")
    replay = ReplaySet.load(tok, "wiki", a.replay_samples, a.seq_len, allow_fewer=True)
    store = ReferenceStates.build(model, replay, a.store, batch_size=a.batch_size, progress=False)
    steps = a.wait + 1 + a.active
    train = _task_dataset(tok, a.batch_size * (steps + 2), a.seq_len)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  schedule=torch.profiler.schedule(wait=a.wait, warmup=1, active=a.active))

    class Step(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            prof.step()

    args = TrainingArguments(a.out, per_device_train_batch_size=a.batch_size, max_steps=steps, report_to=[],
                             save_strategy="no", seed=0, disable_tqdm=True, learning_rate=1e-5, use_cpu=True)
    trainer = GeReTrainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                          callbacks=[Step()], reference_states=store,
                          gere_config=GeReConfig(loss=a.mode, replay_per_step=a.replay_per_step))
    with prof:
        trainer.train()
    ops = {e.key: e.self_cpu_time_total / 1e6 / a.active for e in prof.key_averages()}
    ops.pop("ProfilerStep*", None)
    out = {"mode": a.mode, "op_seconds_per_step": sum(ops.values()), "ops": ops}
    if a.mode == "tm":
        out["tm_own_seconds_per_step"] = tm_own_seconds(store, a.replay_per_step)
    return out


def tm_own_seconds(store, per_step: int, repeats: int = 20) -> float:
    """The work TM adds to a CE step, alone: unpack the step's 2-bit labels, the hinge forward and its backward.

    Timed on the step's real shapes (the ``per_step`` longest replay samples, padded, the model's hidden size) with
    the store's own labels and thresholds; everything else in a TM step is also in a CE step.
    """
    import time

    import torch

    from gere_hf.losses import threshold_margin_loss
    from gere_hf.reference import unpack_labels

    longest = sorted(range(len(store)), key=lambda i: -int(store.lengths[i]))[:per_step]
    t = int(store.lengths[longest[0]])
    packed = torch.stack([torch.from_numpy(_padded(store.packed_labels(i), t * store.hidden_size // 4))
                          for i in longest])
    mask = torch.ones(per_step, t, dtype=torch.bool)
    hidden = torch.randn(per_step, t, store.hidden_size, requires_grad=True)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        labels = unpack_labels(packed).view(per_step, t, -1)
        threshold_margin_loss(hidden, labels, store.lower, store.upper, mask).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def _padded(packed, size: int):
    import numpy as np

    out = np.zeros(size, dtype=packed.dtype)
    out[: min(size, packed.size)] = packed[:size]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--modes", default="ce,tm")
    p.add_argument("--wait", type=int, default=3)
    p.add_argument("--active", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--replay-per-step", type=int, default=2)
    p.add_argument("--replay-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:  # child process: one mode
        print("RESULT " + json.dumps(profile_mode(a)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--store", os.path.join(tmp, "store"),
                   "--out", os.path.join(tmp, mode)]
            for key in ("model", "wait", "active", "batch_size", "replay_per_step", "replay_samples", "seq_len"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[-1][7:]))
    ref = results[0]
    print(f"\nmodel={a.model} batch={a.batch_size} seq_len≤{a.seq_len} replay/step={a.replay_per_step} "
          f"profiled steps={a.active}")
    print(f"| mode | operator CPU s/step | vs {ref['mode']} |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['op_seconds_per_step']:.3f} | "
              f"{r['op_seconds_per_step'] / ref['op_seconds_per_step']:.3f}× |")
    for r in results:
        if "tm_own_seconds_per_step" in r:
            own = r["tm_own_seconds_per_step"]
            print(f"\nTM's own work (unpack labels + hinge forward + backward, the step's shapes): {1e3 * own:.2f} ms "
                  f"per step = {100 * own / ref['op_seconds_per_step']:.2f} % of the {ref['mode']} step")
    for r in results[1:]:
        names = set(r["ops"]) | set(ref["ops"])
        diff = sorted(names, key=lambda n: -abs(r["ops"].get(n, 0.0) - ref["ops"].get(n, 0.0)))[: a.top]
        print(f"\nlargest differences, {r['mode']} − {ref['mode']} (ms per step):")
        for n in diff:
            print(f"  {1e3 * (r['ops'].get(n, 0.0) - ref['ops'].get(n, 0.0)):+8.2f}  {n}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(a).items() if k not in ("mode", "store", "out")},
                       "results": [{k: v for k, v in r.items() if k != "ops"} for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
