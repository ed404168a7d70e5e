# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Keep a finished (or partly finished) sweep's results in the repository, small enough to commit.

Copies what the comparison is computed from and what ``gere-hf sweep --resume`` needs to keep a run as finished —
``sweep.json``, ``comparison.{md,json,png}``, the shared base rows (``base/<key>/*.json``), and per run
``results.json``, ``sweep_run.json`` (the run's settings, final answers and training time) and ``report.md`` — and
leaves out the stage weights, stores, checkpoints and run_state.json.
A later checkout extends the comparison by copying the folder back and resuming (the recipe is compared by content,
so the copy may live anywhere):

    python benchmarks/archive_sweep.py sweeps/benchmark benchmarks/results/sweep_benchmark
    cp -r benchmarks/results/sweep_benchmark sweeps/benchmark
    gere-hf sweep recipes/sweep_paper_arms.yaml --resume
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil

KEPT = ("sweep.json", "comparison.md", "comparison.json", "comparison.png", "base/*/*.json",
        "runs/*/seed-*/results.json", "runs/*/seed-*/sweep_run.json", "runs/*/seed-*/report.md")


def archive(sweep_dir: str, dest: str) -> list[str]:
    """Copy the kept files of ``sweep_dir`` to ``dest`` (same layout); returns the relative paths copied."""
    if not os.path.isfile(os.path.join(sweep_dir, "sweep.json")):
        raise SystemExit(f"{sweep_dir} holds no sweep (no sweep.json); give the sweep's output_dir.")
    copied = []
    for pattern in KEPT:
        for path in sorted(glob.glob(os.path.join(sweep_dir, pattern))):
            rel = os.path.relpath(path, sweep_dir)
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(path, os.path.join(dest, rel))
            copied.append(rel)
    return copied


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("dest")
    a = p.parse_args(argv)
    copied = archive(a.sweep_dir, a.dest)
    runs = sum(1 for c in copied if c.endswith("sweep_run.json"))
    print(f"{len(copied)} files, {runs} finished runs -> {a.dest}")


if __name__ == "__main__":
    main()
