# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The store build of this checkout against the build of an earlier commit, in one process, taking turns.

    python benchmarks/bench_store_vs_commit.py --commit c3ac7f5 --model smollm2-135m --num-samples 100 --threads 1

The earlier commit's ``gere_hf`` is extracted with ``git archive`` and imported under another name, so both builds
run on the same model object, the same replay set and the same batches, in the order limit, old, new, limit, old,
new, ..., limit (a slow phase of a shared machine hits both alike); the best run of each counts, and CPU-time ratios
are printed beside wall-clock ones. The two stores are compared byte for byte (every file but the manifest, and the
manifest without its build section). Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import bench_model  # noqa: E402
from bench_store import _Clock, bare_forward  # noqa: E402

from gere_hf.reference import ReferenceStates  # noqa: E402
from gere_hf.replay import ReplaySet  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_commit(commit: str, workdir: str):
    """``gere_hf.reference`` as of ``commit``, imported as ``gere_hf_<sha>.reference`` (only relative imports)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO_ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "gere_hf"], cwd=REPO_ROOT, check=True, capture_output=True)
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(workdir, filter="data")
    name = f"gere_hf_{sha}"
    os.rename(os.path.join(workdir, "gere_hf"), os.path.join(workdir, name))
    sys.path.insert(0, workdir)
    return sha, importlib.import_module(f"{name}.reference")


def store_bytes(path: str) -> dict:
    files = {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if n != "manifest.json"}
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest.pop("build")
    return {"files": files, "manifest": manifest}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commit", required=True, help="the earlier commit whose build to compare with")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--max-length", type=int, default=563)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--tiny-hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="gere-bench-commit-")
    try:
        sha, old = import_commit(args.commit, os.path.join(workdir, "src"))
        model, tokenizer = bench_model(args.model, args.dtype, args.device, tiny_hidden=args.tiny_hidden)
        model.eval()
        replay = ReplaySet.load(tokenizer, "wiki", num_samples=args.num_samples, max_length=args.max_length)
        bare_forward(model, ReplaySet(replay.texts[:2], replay.input_ids[:2], replay.max_length), 2, 2)  # warm-up
        runs = {"limit": [], sha: [], "this checkout": []}
        builders = {sha: old.ReferenceStates, "this checkout": ReferenceStates}
        outs = {name: os.path.join(workdir, name.replace(" ", "_")) for name in builders}
        for _ in range(args.repeats):
            runs["limit"].append(bare_forward(model, replay, args.batch_size, args.chunk_size))
            for name, cls in builders.items():
                shutil.rmtree(outs[name], ignore_errors=True)
                with _Clock() as clock:
                    cls.build(model, replay, outs[name], batch_size=args.batch_size, chunk_size=args.chunk_size,
                              progress=False)
                runs[name].append(clock)
        runs["limit"].append(bare_forward(model, replay, args.batch_size, args.chunk_size))
        old_store, new_store = store_bytes(outs[sha]), store_bytes(outs["this checkout"])
        identical = old_store == new_store
        differing = sorted(n for n in set(old_store["files"]) | set(new_store["files"])
                           if old_store["files"].get(n) != new_store["files"].get(n))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {name: min(c.wall for c in clocks) for name, clocks in runs.items()}
    best_cpu = {name: min(c.cpu for c in clocks) for name, clocks in runs.items()}
    result = {
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "machine": platform.machine(), "load_average": list(os.getloadavg())},
        "settings": vars(args), "commit": sha, "tokens": replay.num_tokens, "hidden": int(model.config.hidden_size),
        "seconds_runs": {name: [round(c.wall, 3) for c in clocks] for name, clocks in runs.items()},
        "cpu_seconds_runs": {name: [round(c.cpu, 3) for c in clocks] for name, clocks in runs.items()},
        "best_seconds": best, "best_cpu_seconds": best_cpu, "stores_identical": identical,
        "differing_files": differing if not identical else [],
    }
    print(f"\nStore build, this checkout vs {sha}: {args.model}, {len(replay)} samples, {replay.num_tokens} tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| run | best s | tok/s | vs limit (wall) | vs limit (CPU) | runs (s) |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {best[name]:.2f} | {replay.num_tokens / best[name]:.0f} | {best['limit'] / best[name]:.3f} | "
              f"{best_cpu['limit'] / best_cpu[name]:.3f} | {', '.join(f'{c.wall:.1f}' for c in runs[name])} |")
    print(f"stores byte-identical (manifest without its build section): {identical}"
          + ("" if identical else f"; differing files: {differing}"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
