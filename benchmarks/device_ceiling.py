# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""The two ceilings of the device the other benchmarks run on: a large bf16 matrix product (TFLOP/s) and a large
device-to-device copy (bytes read + written per second), on random data, timed with device events after warm-up.
Model FLOP utilisation (benchmarks/bench_step.py) is given against the datasheet's dense bf16 rate and against this.

    python benchmarks/device_ceiling.py --json ceiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after three warm-ups (device events on CUDA)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="matrix side (default: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy size (default: 4 GiB on CUDA, 64 MiB on CPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    n = a.size or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    x, y = (torch.randn(n, n, device=a.device, dtype=dtype) for _ in range(2))
    matmul_s = _time(lambda: x @ y, a.repeats)
    nbytes = a.copy_bytes or (4 * 2**30 if cuda else 64 * 2**20)
    src = torch.randn(nbytes // 4, device=a.device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), a.repeats)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
              "matmul_size": n, "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
              "copy_bytes": nbytes, "copy_bytes_per_second": 2 * nbytes / copy_s}
    print(f"ceiling on {result['device']}: {result['dtype']} {n}³ matrix product {result['matmul_tflops']:.1f} TFLOP/s; "
          f"copy of {nbytes / 2**30:.2f} GiB {result['copy_bytes_per_second'] / 1e12:.2f} TB/s (read + write)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
