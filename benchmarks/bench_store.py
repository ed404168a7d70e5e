# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Benchmark of the reference store: build throughput against a bare forward, size on disk, and growth.

    python benchmarks/bench_store.py --model smollm2-135m --num-samples 200 --json benchmarks/results/store.json
    python benchmarks/bench_store.py --model tiny --growth 250,500,1000,2000 --growth-hidden 64,128,256,512,1024,2048

What is measured
  (a) limit:  a bare ``torch.no_grad()`` forward of the same model over the same tokens, in the same length-sorted,
              right-padded batches the build uses (``use_cache=False``, ``logits_to_keep=1`` as the build passes:
              the LM head is not needed for labels). Runs interleave with the builds (limit, build, ..., limit) and
              the best of each counts; CPU-time ratios are reported too, as they suffer less from a shared machine.
  (b) build:  ``ReferenceStates.build`` end to end (fingerprint, forwards, statistics, 2-bit labels, assembly,
              checksums, manifest) in a fresh directory; tokens/s and its ratio to the limit (target ≥ 0.85).
  (c) size:   bits on disk per (token, hidden) element, all files counted (target ≤ 2.1), beside the 32 bits of the
              official layout (fp32 per-sample hidden-state files: 4 bytes × tokens × hidden).
  (d) growth: (optional) build time and store size for several sample counts and hidden sizes of a random tiny
              Llama (ByT5 byte tokenizer, wiki texts), with least-squares slopes against tokens × hidden.
  (e) forwards per pass (from the manifest), peak device memory (CUDA) of the limit and of the build, and with
              --rounding / --io-probe the two costs of the design not taken (half-precision states: labels
              flipped by the rounding; the states' size in half precision written to this disk and read back).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from gere_hf.models import tiny_llama
from gere_hf.reference import ChunkPlan, ReferenceStates
from gere_hf.replay import ReplaySet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import bench_model  # noqa: E402


class _Clock:
    """Wall time and this process's CPU time (all threads): on a shared machine the CPU time is the steadier one."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bare_forward(model, replay: ReplaySet, batch_size: int, chunk_size: int) -> _Clock:
    """The limit: the build's own batches, forwarded with nothing else done."""
    plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
    model.eval()
    with _Clock() as clock, torch.no_grad():
        for c in range(len(plan.chunks)):
            for batch in plan.batches(c):
                ids, mask = replay.padded_batch(batch)
                device = next(model.parameters()).device
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return clock


def _peak_device_bytes(model, run) -> tuple[object, int | None]:
    """``run()`` and the peak device memory allocated while it ran (CUDA only; None elsewhere)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    torch.cuda.synchronize()
    return result, int(torch.cuda.max_memory_allocated(device))


def measure(model, replay: ReplaySet, batch_size: int, chunk_size: int, workdir: str, limit: bool = True,
            repeats: int = 1, keep_states_bytes: int | None = None) -> dict:
    """Interleaved runs (limit, build, limit, build, ..., limit); the best run of each counts (noise only adds time)."""
    tokens, hidden = replay.num_tokens, int(model.config.hidden_size)
    # Warm-up: the first forwards of a process pay for allocator growth and kernel selection.
    bare_forward(model, ReplaySet(replay.texts[:2], replay.input_ids[:2], replay.max_length), 2, 2)
    limits, builds = [], []
    peaks = {"limit": None, "build": None}
    out = os.path.join(workdir, "store")
    build_kwargs = {} if keep_states_bytes is None else {"keep_states_bytes": keep_states_bytes}

    def one_limit():
        clock, peak = _peak_device_bytes(model, lambda: bare_forward(model, replay, batch_size, chunk_size))
        peaks["limit"] = max(peaks["limit"] or 0, peak) if peak is not None else None
        limits.append(clock)

    for _ in range(repeats):
        if limit:
            one_limit()
        shutil.rmtree(out, ignore_errors=True)

        def one_build():
            with _Clock() as clock:
                ReferenceStates.build(model, replay, out, batch_size=batch_size, chunk_size=chunk_size,
                                      progress=False, **build_kwargs)
            return clock

        clock, peak = _peak_device_bytes(model, one_build)
        peaks["build"] = max(peaks["build"] or 0, peak) if peak is not None else None
        builds.append(clock)
    if limit:
        one_limit()
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        build_record = json.load(f)["build"]
    forwards = build_record.get("forwards")
    files = {name: os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)}
    total = sum(files.values())
    build_s = min(c.wall for c in builds)
    result = {
        "samples": len(replay),
        "tokens": tokens,
        "hidden": hidden,
        "build_seconds_runs": [round(c.wall, 3) for c in builds],
        "build_cpu_seconds_runs": [round(c.cpu, 3) for c in builds],
        "build_seconds": build_s,
        "build_tokens_per_second": tokens / build_s,
        "bytes_on_disk": total,
        "bytes_by_file": files,
        "bits_per_element": 8 * total / (tokens * hidden),
        "label_bits_per_element": 8 * files["labels.bin"] / (tokens * hidden),
        "official_fp32_bytes": 4 * tokens * hidden,
        "official_bits_per_element": 32.0,
        "compression_vs_official": 4 * tokens * hidden / total,
        "forwards": forwards,  # batches forwarded per pass (statistics, labels again, padding), from the manifest
        "seconds_by_phase": build_record.get("seconds_by_phase"),  # the last build's, from its manifest
        "peak_device_bytes": peaks,  # CUDA: torch.cuda.max_memory_allocated during the limit and the build
    }
    if limit:
        limit_s = min(c.wall for c in limits)
        result.update({
            "limit_seconds_runs": [round(c.wall, 3) for c in limits],
            "limit_cpu_seconds_runs": [round(c.cpu, 3) for c in limits],
            "limit_seconds": limit_s,
            "limit_tokens_per_second": tokens / limit_s,
            "build_to_limit_ratio": limit_s / build_s,
            "build_to_limit_ratio_cpu": min(c.cpu for c in limits) / min(c.cpu for c in builds),
            # Each build against the mean of the limits just before and after it: robust to slow drifts in load.
            "build_to_limit_ratio_pairs": [0.5 * (limits[i].wall + limits[i + 1].wall) / builds[i].wall
                                           for i in range(len(builds))],
        })
    shutil.rmtree(out, ignore_errors=True)
    return result


def rounding_flips(model, replay: ReplaySet, store: ReferenceStates, batch_size: int, chunk_size: int) -> dict:
    """The design not taken, measured: labels of the states rounded to bf16 / fp16 before labelling (keeping or
    spilling them in half precision) against the labels of the states as the forward made them. The store keeps
    the forward's own states, so its labels are the latter exactly."""
    from gere_hf.losses import threshold_labels
    from gere_hf.models import find_final_norm

    plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
    captured = []
    handle = find_final_norm(model)[1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    flips = {"bfloat16": 0, "float16": 0}
    total = 0
    dtype = None
    device = next(model.parameters()).device
    lower, upper = store.lower.to(device), store.upper.to(device)
    try:
        with torch.no_grad():
            for c in range(len(plan.chunks)):
                for batch in plan.batches(c):
                    lengths = [replay.lengths[i] for i in batch]
                    ids, mask = replay.padded_batch(batch)
                    captured.clear()
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
                    states = torch.cat([captured[-1][row, :n] for row, n in enumerate(lengths)])
                    dtype = states.dtype
                    exact = threshold_labels(states, lower, upper)
                    total += exact.numel()
                    for name, half in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
                        flips[name] += int((threshold_labels(states.to(half), lower, upper) != exact).sum())
    finally:
        handle.remove()
    return {"states_dtype": str(dtype).removeprefix("torch."), "elements": total,
            "fraction_flipped": {k: v / max(total, 1) for k, v in flips.items()}, "flipped": flips}


def io_probe(workdir: str, nbytes: int, piece: int = 64 << 20) -> dict:
    """What spilling the states in half precision to this disk would cost: ``nbytes`` written (with fsync) and read
    back (likely from the page cache), in pieces."""
    path = os.path.join(workdir, "io_probe.bin")
    data = np.random.default_rng(0).integers(0, 255, size=min(piece, nbytes), dtype=np.uint8).tobytes()
    with _Clock() as write:
        with open(path, "wb") as f:
            done = 0
            while done < nbytes:
                n = min(len(data), nbytes - done)
                f.write(data[:n])
                done += n
            f.flush()
            os.fsync(f.fileno())
    with _Clock() as read:
        with open(path, "rb") as f:
            while f.read(piece):
                pass
    os.remove(path)
    return {"bytes": nbytes, "write_seconds": write.wall, "read_seconds": read.wall,
            "write_bytes_per_second": nbytes / max(write.wall, 1e-9), "read_bytes_per_second": nbytes / max(read.wall, 1e-9)}


def linear_fit(x, y) -> dict:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


def growth(args, workdir: str) -> dict:
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    points = []
    sweep = [(n, args.growth_fixed_hidden) for n in args.growth] + [
        (args.growth_fixed_samples, h) for h in args.growth_hidden if h != args.growth_fixed_hidden
    ]
    for n, h in sweep:
        replay = ReplaySet.load(tokenizer, args.replay, num_samples=n, max_length=args.growth_max_length)
        model = tiny_llama(hidden_size=h, num_layers=args.growth_layers, seed=0).eval()
        r = measure(model, replay, args.batch_size, args.chunk_size, workdir, limit=not args.growth_no_limit)
        r["overhead_seconds"] = r["build_seconds"] - r.get("limit_seconds", 0.0)
        points.append(r)
        print(f"  growth: samples={n:5d} hidden={h:5d} tokens={r['tokens']:8d} build={r['build_seconds']:7.2f}s "
              f"size={r['bytes_on_disk'] / 2**20:8.2f} MiB bits/elem={r['bits_per_element']:.3f}", flush=True)
        del model
    elements = [p["tokens"] * p["hidden"] for p in points]
    fits = {
        "bytes_vs_tokens_x_hidden": linear_fit(elements, [p["bytes_on_disk"] for p in points]),
        "build_seconds_vs_tokens_x_hidden": linear_fit(elements, [p["build_seconds"] for p in points]),
    }
    if not args.growth_no_limit:
        fits["overhead_seconds_vs_tokens_x_hidden"] = linear_fit(elements, [p["overhead_seconds"] for p in points])
    fits["bytes_vs_tokens_x_hidden"]["slope_bits"] = 8 * fits["bytes_vs_tokens_x_hidden"]["slope"]
    # Bytes split into a per-element part (the 2-bit labels) and a per-token part (the int32 token ids).
    design = np.array([[e, p["tokens"], 1.0] for e, p in zip(elements, points)], dtype=np.float64)
    coef = np.linalg.lstsq(design, np.array([p["bytes_on_disk"] for p in points], dtype=np.float64), rcond=None)[0]
    fits["bytes_per_element_and_per_token"] = {"bits_per_element": 8 * float(coef[0]),
                                               "bytes_per_token": float(coef[1]), "intercept": float(coef[2])}
    return {"settings": {"max_length": args.growth_max_length, "layers": args.growth_layers,
                         "fixed_hidden": args.growth_fixed_hidden, "fixed_samples": args.growth_fixed_samples},
            "points": points, "fits": fits}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="'tiny' (random tiny Llama + ByT5), a built-in or a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--replay", default="wiki")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=563)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--tiny-hidden", type=int, default=256, help="hidden size of --model tiny")
    parser.add_argument("--repeats", type=int, default=2, help="builds (and limits around them); the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--growth", type=_ints, default=[], help="sample counts for the growth sweep, e.g. 250,500")
    parser.add_argument("--growth-hidden", type=_ints, default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--growth-fixed-hidden", type=int, default=128, help="hidden size of the sample-count sweep")
    parser.add_argument("--growth-fixed-samples", type=int, default=250, help="samples of the hidden-size sweep")
    parser.add_argument("--growth-max-length", type=int, default=128)
    parser.add_argument("--growth-layers", type=int, default=1)
    parser.add_argument("--growth-no-limit", action="store_true", help="skip the bare forwards in the sweep")
    parser.add_argument("--skip-main", action="store_true", help="only the growth sweep")
    parser.add_argument("--keep-states-bytes", type=int, default=None,
                        help="the build's keep_states_bytes (default: its own; 0: every chunk forwarded twice)")
    parser.add_argument("--rounding", action="store_true",
                        help="also count the labels that rounding the states to bf16/fp16 would flip")
    parser.add_argument("--io-probe", action="store_true",
                        help="also time writing and reading the states' size in half precision on this disk")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "machine": platform.machine(), "load_average": list(os.getloadavg())},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    workdir = tempfile.mkdtemp(prefix="gere-bench-")
    try:
        if not args.skip_main:
            model, tokenizer = bench_model(args.model, args.dtype, args.device, tiny_hidden=args.tiny_hidden)
            replay = ReplaySet.load(tokenizer, args.replay, num_samples=args.num_samples, max_length=args.max_length)
            r = measure(model.eval(), replay, args.batch_size, args.chunk_size, workdir, repeats=args.repeats,
                        keep_states_bytes=args.keep_states_bytes)
            results["main"] = r
            print(f"\nReference store benchmark: {args.model}, {r['samples']} samples, {r['tokens']} tokens, "
                  f"hidden {r['hidden']}, batch {args.batch_size}, {torch.get_num_threads()} threads")
            rows = [
                ("limit (bare batched forward)", f"{r['limit_tokens_per_second']:.0f} tok/s",
                 f"best of {', '.join(f'{s:.1f}' for s in r['limit_seconds_runs'])} s"),
                ("store build", f"{r['build_tokens_per_second']:.0f} tok/s",
                 f"best of {', '.join(f'{s:.1f}' for s in r['build_seconds_runs'])} s; ratio to limit "
                 f"{r['build_to_limit_ratio']:.3f} wall, {r['build_to_limit_ratio_cpu']:.3f} CPU time, per build "
                 f"{', '.join(f'{x:.3f}' for x in r['build_to_limit_ratio_pairs'])} (target >= 0.85)"),
                ("size on disk", f"{r['bits_per_element']:.3f} bits/elem",
                 f"{r['bytes_on_disk'] / 2**20:.2f} MiB (target <= 2.1 bits); labels alone "
                 f"{r['label_bits_per_element']:.3f} bits"),
                ("official fp32 layout", "32 bits/elem",
                 f"{r['official_fp32_bytes'] / 2**20:.1f} MiB ({r['compression_vs_official']:.1f}x larger)"),
            ]
            if r["forwards"]:
                f = r["forwards"]
                rows.append(("forwards (batches)", f"{f['statistics']} + {f['labels']}",
                             f"for statistics + again for labels (states that did not stay on the device); "
                             f"{f['padding']} padding"))
            if r.get("seconds_by_phase"):
                rows.append(("build phases (last build)", f"{sum(r['seconds_by_phase'].values()):.2f} s",
                             ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds_by_phase"].items())))
            if r["peak_device_bytes"]["build"] is not None:
                p = r["peak_device_bytes"]
                rows.append(("peak device memory", f"{p['build'] / 2**20:.0f} MiB",
                             f"build; bare forward {p['limit'] / 2**20:.0f} MiB"))
            if args.rounding:
                store_dir = os.path.join(workdir, "rounding_store")
                store = ReferenceStates.build(model, replay, store_dir, batch_size=args.batch_size,
                                              chunk_size=args.chunk_size, progress=False)
                rf = rounding_flips(model, replay, store, args.batch_size, args.chunk_size)
                r["rounding"] = rf
                rows.append(("labels flipped by rounding", f"{rf['fraction_flipped']['bfloat16']:.2e} bf16",
                             f"{rf['fraction_flipped']['float16']:.2e} fp16, of {rf['elements']} elements "
                             f"({rf['states_dtype']} states; the store keeps them unrounded)"))
            if args.io_probe:
                io = io_probe(workdir, r["tokens"] * r["hidden"] * 2)
                r["io_probe"] = io
                rows.append(("half states to disk and back", f"{io['write_seconds'] + io['read_seconds']:.2f} s",
                             f"{io['bytes'] / 2**20:.0f} MiB: write+fsync {io['write_bytes_per_second'] / 2**20:.0f} "
                             f"MiB/s, read {io['read_bytes_per_second'] / 2**20:.0f} MiB/s (the design not taken)"))
            for name, value, note in rows:
                print(f"  {name:<30} {value:>18}   {note}")
            del model
        if args.growth:
            print("\nGrowth sweep (random tiny Llama, ByT5 bytes, wiki texts):")
            g = growth(args, workdir)
            results["growth"] = g
            for name, fit in g["fits"].items():
                if "slope" not in fit:
                    print(f"  {name:<40} " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items()))
                    continue
                extra = f" ({fit['slope_bits']:.3f} bits/element)" if "slope_bits" in fit else ""
                print(f"  {name:<40} slope {fit['slope']:.4g}{extra}, intercept {fit['intercept']:.4g}, "
                      f"R² {fit['r2']:.4f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
