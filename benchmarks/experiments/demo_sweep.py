"""The whole demo (three runs: none, ce, tm) with changed settings; one JSON record per invocation.

Each invocation runs :func:`gere_hf.demo.run_demo` with ``--set`` overrides of :class:`gere_hf.demo.DemoSettings`,
and records the settings, the accuracy matrices, AP/BWT/FWT/forgetting, ΔNLL on the held-out wiki text and on news
(outside the replay domain; both measured by the demo), wall and CPU seconds, and the load average.

    OMP_NUM_THREADS=1 python benchmarks/experiments/demo_sweep.py --tag lr1e-3 --set learning_rate=1e-3

CPU seconds of a 1-thread run barely depend on other load on a shared machine (see cost_model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, machine  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="A DemoSettings field, as JSON.")
    p.add_argument("--losses", default="none,ce,tm")
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="Demo folder (default: a temporary one, removed after).")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    from gere_hf.demo import run_demo

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    out = args.out or os.path.join("/tmp", f"gere_demo_sweep_{args.tag}")
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    start_load = os.getloadavg()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = run_demo(out, full=args.full, losses=args.losses.split(","), resume=args.resume, overrides=overrides)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    settings = result.settings
    record = {"tag": args.tag, "overrides": overrides, "settings": settings, "machine": machine(),
              "loadavg_start": start_load, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
              "table": result.table, "rows": result.rows(), "runs": {}}
    for loss, results in result.results.items():
        record["runs"][loss] = {
            "matrix": results["matrix"], "metrics": results["metrics"],
            "general": [{k: g.get(k) for k in ("stage", "nll", "delta_nll_vs_base")} for g in results["general"]],
            "train_seconds": [s.get("train") and s["train"].get("train_runtime") for s in results["run"]["stages"]],
        }
    if result.news is not None:  # the demo measured news text (outside the replay domain) itself
        record["news_nll"] = {k: round(v, 4) for k, v in result.news["nll"].items()}
        record["news_delta_nll"] = {k: round(v, 4) for k, v in result.news["delta_nll_vs_base"].items()}
    path = append_result("demo_sweep", record)
    print(f"wall {wall:.0f} s, cpu {cpu:.0f} s; appended to {path}")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
