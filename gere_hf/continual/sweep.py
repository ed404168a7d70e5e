"""`gere-hf sweep`: one recipe, several arms, several seeds; every (arm, seed) run, then the comparison with intervals.

A sweep file names a recipe, the arms (each a named set of recipe overrides, ``--set`` syntax) and the seeds::

    recipe: recipes/benchmark_cpu.yaml
    output_dir: sweeps/benchmark
    seeds: [0, 1, 2]
    baseline: ce
    arms:
      none: {gere.loss: none}
      ce: {gere.loss: ce}
      tm: {gere.loss: tm}

Each (arm, seed) is an ordinary recipe run in ``output_dir/runs/<arm>/seed-<seed>`` (the recipe with the arm's
overrides and ``seed`` set), run in a process of its own; ``parallel`` runs go at a time, each with
``cpu_count / parallel`` threads (on a 2-core machine two one-thread runs side by side, which also keeps one run's
idle moments — loading, writing — from idling the machine). Shared, because it is the same by construction:
the reference store of runs with the same base model, replay texts and store settings (``output_dir/stores/<key>``,
fingerprint-checked on every open), and row 0 of the accuracy matrix and the base model's news NLL of runs with the
same model, seed, tasks, replay texts and evaluation settings (``output_dir/base/<key>``); the keys hash those
fields, so arms that change them get their own. Nothing else is shared.

An interrupted sweep continues with ``--resume``: finished runs are kept, an unfinished run resumes after its last
finished stage. The comparison (``comparison.json``, ``comparison.md``, ``comparison.png``) gives per arm the mean and
95 % interval over seeds of every metric, the paired differences against the baseline arm, and per-example paired
tests of the final accuracies (:mod:`gere_hf.evaluation.statistics` says which and why; docs/sweep.md shows an
example).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..evaluation.statistics import mcnemar_exact, mean_interval, paired_bootstrap, paired_interval
from ..fileio import write_json
from .recipe import RecipeError, apply_overrides, check_keys, load_recipe, parse_recipe
from .state import RUN_STATE_FILE, load_stage_model

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RUN_SUMMARY_FILE = "sweep_run.json"
BASE_ROW_FILE = "base_row.json"
BASE_NEWS_FILE = "base_news.json"
# Recipe keys that change how a run trains but neither what it is evaluated on nor its base model: runs that differ
# only in these share row 0. Everything else is part of the key.
TRAINING_ONLY_KEYS = ("name", "output_dir", "peft", "adapters", "training", "hub", "tracking", "overwrite_output_dir",
                      "keep_checkpoints", "method")
TRAINING_ONLY_GERE_KEYS = ("loss", "weight", "replay_share", "ce_reduction", "replay_per_step", "store_dir",
                           "rebuild_store", "nonfinite", "reference", "store_batch_size", "store_dtype", "topk",
                           "kl_temperature", "threshold_k")
TRAINING_ONLY_STAGE_KEYS = ("num_train_epochs", "learning_rate", "max_steps", "training")
# The metrics compared, as (name, what it is, higher is better).
METRICS = (
    ("ap", "AP: final mean accuracy", True),
    ("bwt", "BWT: change of earlier tasks since learned", True),
    ("fwt", "FWT: accuracy before training a task, minus the base model's", True),
    ("mean_forgetting", "forgetting: mean drop from a task's best", False),
    ("delta_nll_wiki", "ΔNLL held-out Wikipedia (nats/token)", False),
    ("delta_nll_news", "ΔNLL news, outside the replay domain (nats/token)", False),
    ("mmlu", "MMLU final accuracy", True),
    ("delta_mmlu", "ΔMMLU vs base", True),
    ("train_minutes", "training time (min)", False),
)


class SweepError(ValueError):
    """A sweep file or folder that cannot work. The message names the problem and the fix."""


@dataclass
class SweepConfig:
    """A sweep: the recipe, its arms and seeds, and how to run them. ``gere-hf sweep SWEEP.yaml`` reads one."""

    recipe: str = field(metadata={"help": "The recipe every run starts from (a path; relative to the sweep file)."})
    output_dir: str = field(metadata={"help": "Where the runs, the shared stores and rows, and the comparison go."})
    arms: dict = field(metadata={"help": "Arm name → recipe overrides ({dotted.key: value}, as --set takes them); "
                                         "an empty mapping is the recipe as it is."})
    seeds: list = field(default_factory=lambda: [0, 1, 2],
                        metadata={"help": "Seeds; each arm runs once per seed (the recipe's `seed`)."})
    baseline: str | None = field(default=None, metadata={"help": "The arm the others are compared with, seed by "
                                                                 "seed (default: the first arm)."})
    parallel: int | None = field(default=None, metadata={"help": "Runs at a time (default: 2 on a machine with 2 or "
                                                                 "more cores, else 1)."})
    threads: int | None = field(default=None, metadata={"help": "Threads per run (default: the cores / parallel)."})
    news_texts: int = field(default=100, metadata={"help": "News articles (gensim's Lee corpus: general English the "
                                                           "Wikipedia replay texts do not cover) whose NLL change "
                                                           "measures retention outside the replay domain; 0: none."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples of the per-example bootstrap."})
    path: str | None = field(default=None, repr=False, metadata={"help": "The sweep file."})

    @property
    def baseline_arm(self) -> str:
        return self.baseline or next(iter(self.arms))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}


@dataclass(frozen=True)
class SweepRun:
    """One (arm, seed) of a sweep: its folder, its recipe mapping, and the keys of what it shares."""

    arm: str
    seed: int
    run_dir: str
    recipe: dict
    base_dir: str

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed}"


# ----------------------------------------------------------------------------------------------------------------------
# Reading and planning
# ----------------------------------------------------------------------------------------------------------------------


def load_sweep(path: str, overrides: tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep file, apply ``--set`` overrides to it, and check it and every run's recipe (before any work)."""
    if not os.path.isfile(path):
        raise SweepError(f"The sweep file {path!r} does not exist; recipes/sweep_benchmark.yaml is an example.")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (recipe:, output_dir:, arms:, seeds:, ...).")
    data = apply_overrides(data, overrides)
    try:
        check_keys(data, [f.name for f in dataclasses.fields(SweepConfig) if f.name != "path"], "the sweep file")
    except RecipeError as err:
        raise SweepError(str(err)) from None
    for key in ("recipe", "output_dir", "arms"):
        if not data.get(key):
            raise SweepError(f"{path}: the sweep file has no {key!r}; recipes/sweep_benchmark.yaml shows one.")
    folder = os.path.dirname(os.path.abspath(path))
    recipe = data["recipe"]
    if not os.path.isabs(recipe) and not os.path.isfile(recipe):
        recipe = os.path.join(folder, recipe)
    cfg = SweepConfig(**{**data, "recipe": recipe}, path=os.path.abspath(path))
    check_sweep(cfg)
    return cfg


def check_sweep(cfg: SweepConfig) -> None:
    if not isinstance(cfg.arms, dict) or not cfg.arms:
        raise SweepError("arms must be a mapping of arm names to overrides, e.g. `arms: {ce: {gere.loss: ce}}`.")
    for name, overrides in cfg.arms.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise SweepError(f"Arm name {name!r}: use letters, digits, '.', '-' and '_' (it names a folder).")
        if not isinstance(overrides, dict | type(None)):
            raise SweepError(f"Arm {name!r}: its overrides must be a mapping {{dotted.key: value}}, got "
                             f"{type(overrides).__name__}.")
    if not isinstance(cfg.seeds, list) or not cfg.seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds):
        raise SweepError(f"seeds must be a non-empty list of integers, got {cfg.seeds!r}.")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise SweepError(f"seeds lists a seed twice ({cfg.seeds}); give each once.")
    if cfg.baseline is not None and cfg.baseline not in cfg.arms:
        raise SweepError(f"baseline {cfg.baseline!r} is not an arm; the arms are {list(cfg.arms)}.")
    for name in ("parallel", "threads"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SweepError(f"{name} must be a positive integer (or absent), got {value!r}.")
    if not isinstance(cfg.news_texts, int) or cfg.news_texts < 0:
        raise SweepError(f"news_texts must be an integer ≥ 0, got {cfg.news_texts!r}.")
    if not os.path.isfile(cfg.recipe):
        raise SweepError(f"The sweep's recipe {cfg.recipe!r} does not exist (paths are relative to the working "
                         "directory or to the sweep file).")


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_key(raw: dict) -> str:
    """What row 0 depends on: the recipe without its training-only keys (``TRAINING_ONLY_*``)."""
    kept = {k: v for k, v in raw.items() if k not in TRAINING_ONLY_KEYS}
    kept["gere"] = {k: v for k, v in (raw.get("gere") or {}).items() if k not in TRAINING_ONLY_GERE_KEYS}
    kept["stages"] = [{k: v for k, v in s.items() if k not in TRAINING_ONLY_STAGE_KEYS} if isinstance(s, dict) else s
                      for s in raw.get("stages") or []]
    return _key(kept)


def store_key(recipe) -> str | None:
    """What a 'base' reference store depends on (``None``: the run builds none, or one of its own per stage)."""
    g = recipe.gere
    if not g.replay_enabled or g.reference != "base":
        return None
    extras = sorted(g.store_extras)
    precision = {k: bool((recipe.training or {}).get(k)) for k in ("bf16", "fp16")}
    return _key({"model": dataclasses.asdict(recipe.model), "source": g.replay_source, "n": g.replay_num_samples,
                 "max_length": g.replay_max_length, "seed": g.replay_seed, "column": g.replay_text_column,
                 "k": g.threshold_k, "extras": extras, "topk": g.topk if "topk" in extras else None,
                 "temperature": g.kl_temperature if "topk" in extras else None, "dtype": g.store_dtype,
                 "precision": precision})


def plan_runs(cfg: SweepConfig) -> list[SweepRun]:
    """Every (arm, seed) run, arm by arm (so that runs at a time have different seeds and build different stores),
    with its recipe checked."""
    base = load_recipe(cfg.recipe).raw
    out = os.path.abspath(cfg.output_dir)
    runs = []
    for arm, overrides in cfg.arms.items():
        for seed in cfg.seeds:
            sets = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
            try:
                raw = apply_overrides(copy.deepcopy(base), [*sets, f"seed={seed}"])
            except RecipeError as err:
                raise SweepError(f"Arm {arm!r}: {err}") from None
            run_dir = os.path.join(out, "runs", arm, f"seed-{seed}")
            raw.update(output_dir=run_dir, name=f"{arm}-seed{seed}")
            raw.pop("overwrite_output_dir", None)
            try:
                recipe = parse_recipe(copy.deepcopy(raw), path=cfg.recipe)
            except (RecipeError, ValueError) as err:
                raise SweepError(f"Arm {arm!r}, seed {seed}: {err}") from None
            key = store_key(recipe)
            if key is not None and not (raw.get("gere") or {}).get("store_dir"):
                raw.setdefault("gere", {})["store_dir"] = os.path.join(out, "stores", key)
            runs.append(SweepRun(arm, seed, run_dir, raw, os.path.join(out, "base", base_key(raw))))
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ----------------------------------------------------------------------------------------------------------------------


def run_one(spec: dict) -> dict:
    """Run one planned run (``spec``: what :func:`_spec` writes) and measure its news retention; returns the summary
    written to ``RUN_SUMMARY_FILE``."""
    import torch

    from .shared_rows import SharedBaseRowRunner

    torch.set_num_threads(spec["threads"])
    recipe = parse_recipe(copy.deepcopy(spec["recipe"]), path=spec.get("recipe_path"))
    run_dir = recipe.output_dir
    os.makedirs(spec["base_dir"], exist_ok=True)
    resume = os.path.isfile(os.path.join(run_dir, RUN_STATE_FILE))
    start = time.time()

    def say(message: str) -> None:
        print(f"[sweep] {spec['label']}: {message}", file=sys.stderr, flush=True)

    runner = SharedBaseRowRunner(recipe, resume=resume, base_row_path=os.path.join(spec["base_dir"], BASE_ROW_FILE),
                                 say=say)
    runner.run()
    with open(os.path.join(run_dir, RUN_STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    summary = {"arm": spec["arm"], "seed": spec["seed"], "seconds": time.time() - start, "news": None,
               "settings": run_settings(spec["recipe"], spec["news_texts"]), **answers_and_train_time(state)}
    if spec["news_texts"]:
        say("measuring news text (outside the replay domain) ...")
        summary["news"] = _news_retention(recipe, spec["news_texts"], spec["base_dir"])
    write_json(os.path.join(run_dir, RUN_SUMMARY_FILE), summary)
    return summary


def _news_retention(recipe, num_texts: int, base_dir: str) -> dict:
    """The NLL of news articles for the final model, and the base model's (measured once per base key)."""
    from ..evaluation import general_perplexity
    from ..replay import news_texts

    texts = news_texts(num_texts)
    settings = {"max_length": recipe.evaluation.general_max_length, "batch_size": recipe.evaluation.batch_size,
                "progress": False}

    def nll(stage: int) -> float:
        model, tokenizer = load_stage_model(recipe.output_dir, stage, merge=True)
        value = general_perplexity(model, tokenizer, texts, **settings)["nll"]
        del model
        return value

    base_path = os.path.join(base_dir, BASE_NEWS_FILE)
    if os.path.isfile(base_path):
        with open(base_path, encoding="utf-8") as f:
            base = json.load(f)["nll"]
    else:
        base = nll(0)
        write_json(base_path, {"nll": base, "num_texts": len(texts)})
    final = nll(len(recipe.stages))
    return {"num_texts": len(texts), "source": "gensim lee_background.cor", "nll": final, "base_nll": base,
            "delta_nll_vs_base": final - base}


def _spec(cfg: SweepConfig, run: SweepRun, threads: int) -> dict:
    return {"arm": run.arm, "seed": run.seed, "label": run.label, "recipe": run.recipe, "recipe_path": cfg.recipe,
            "base_dir": run.base_dir, "threads": threads, "news_texts": cfg.news_texts}


def _finished(run: SweepRun) -> bool:
    return (os.path.isfile(os.path.join(run.run_dir, RUN_SUMMARY_FILE))
            and os.path.isfile(os.path.join(run.run_dir, "results.json")))


def run_settings(recipe: dict, news_texts: int) -> dict:
    """What a run's figures depend on: its recipe (overrides and seed applied) and the news texts it was measured
    on, without where it was written, so that a sweep moved or archived still matches its runs."""
    settings = json.loads(json.dumps(recipe))
    settings.pop("output_dir", None)
    store_dir = (settings.get("gere") or {}).get("store_dir")
    if store_dir:  # the sweep's stores/<key>: the key is the content, the folder above it a location
        settings["gere"]["store_dir"] = os.path.basename(os.path.normpath(store_dir))
    return {"recipe": settings, "news_texts": news_texts}


def check_finished_runs(cfg: SweepConfig, runs: list[SweepRun], checked_sweep: bool) -> None:
    """Refuse a finished run whose settings are not the ones planned for it: a run folder copied or left from another
    sweep would otherwise be kept, and compared, as if it had been run with this one's. ``checked_sweep``: the output
    folder's sweep.json was compared with this sweep (``check_extension``), which vouches for runs written before
    their settings were recorded."""
    for run in runs:
        if not _finished(run):
            continue
        with open(os.path.join(run.run_dir, RUN_SUMMARY_FILE), encoding="utf-8") as f:
            recorded = json.load(f).get("settings")
        if recorded is None and checked_sweep:
            continue
        planned = run_settings(run.recipe, cfg.news_texts)
        if recorded != planned:
            what = ("records no settings (written before runs recorded them, and no sweep.json vouches for it), "
                    "so it cannot be checked against those this sweep plans for" if recorded is None
                    else "was run with other settings than those this sweep plans for")
            raise SweepError(f"{run.run_dir} holds a finished run that {what} {run.label}"
                             f"{_first_difference(recorded, planned)}. Remove that folder to run it again, or choose "
                             "another output_dir.")


def _first_difference(recorded: dict | None, planned: dict, path: str = "") -> str:
    if not isinstance(recorded, dict) or not isinstance(planned, dict):
        return f" ({path or 'settings'}: {recorded!r} there, {planned!r} planned)" if recorded is not None else ""
    for key in sorted(set(recorded) | set(planned), key=str):
        if recorded.get(key) != planned.get(key):
            return _first_difference(recorded.get(key), planned.get(key), f"{path}.{key}" if path else key)
    return ""


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[gere-hf sweep] {message}", file=sys.stderr, flush=True)


def _progress(run: SweepRun) -> str:
    """Where a running run is, from its run_state.json."""
    path = os.path.join(run.run_dir, RUN_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return "starting"
    stages = state.get("stages") or []
    done = sum(1 for s in stages if s.get("status") == "finished")
    if state.get("finished"):
        return "news text"
    running = next((s for s in stages if s.get("status") == "running"), None)
    if running is not None:
        return f"stage {done + 1}/{len(stages)} ({running.get('name')})"
    return "base evaluation" if done == 0 else f"stage {done}/{len(stages)} evaluated"


# What a resumed sweep may change: it may add arms and seeds (their runs join the finished ones), nothing else.
EXTENDABLE = ("arms", "seeds")
# Settings that change only how the runs are scheduled, never what they compute.
SCHEDULING = ("parallel", "threads")
# Settings that change only how the finished runs are compared: another baseline reads the same runs.
ANALYSIS = ("baseline",)
# Where things are, not what they compute: a sweep folder copied elsewhere (another checkout, a results archive)
# resumes there, its recipe compared by content (``recipe_content``), not by path.
LOCATIONS = ("recipe", "output_dir")


def check_extension(before: dict, now: dict, out: str, what: str = "--resume") -> None:
    """A resumed sweep keeps its settings, its recipe's content and its arms' overrides; it may add arms and seeds
    (``--resume`` with more arms extends a comparison without running the finished arms again) and compare against
    another baseline. ``--compare`` may also leave arms and seeds out (it compares those it lists). ``before`` and
    ``now`` are what ``sweep.json`` holds: ``config`` and ``recipe_content``."""
    by_content = "recipe_content" in before
    ignored = (*EXTENDABLE, *SCHEDULING, *ANALYSIS, *(LOCATIONS if by_content else ()))
    changed = sorted(k for k in set(before["config"]) | set(now["config"])
                     if k not in ignored and before["config"].get(k) != now["config"].get(k))
    if by_content and before["recipe_content"] != now["recipe_content"]:
        changed.append(f"the recipe {now['config']['recipe']}")
    before, now = before["config"], now["config"]
    changed += [f"arms.{a}" for a, o in before.get("arms", {}).items() if a in now.get("arms", {}) and
                now["arms"][a] != o]
    dropped = [f"arms.{a}" for a in before.get("arms", {}) if a not in now.get("arms", {})]
    dropped += [f"seed {s}" for s in before.get("seeds", []) if s not in now.get("seeds", [])]
    if what == "--compare":
        dropped = []
    if changed or dropped:
        differ = ", ".join(changed + [f"{d} (dropped)" for d in dropped])
        raise SweepError(f"{what}: the sweep in {out} was started with other settings ({differ} differ). A resumed "
                         "sweep may add arms and seeds; for anything else choose another output_dir.")


def _sweep_state(cfg: SweepConfig, runs: list[SweepRun]) -> dict:
    """What ``sweep.json`` holds (as JSON reads it back): the settings, the recipe's content and the planned runs."""
    return json.loads(json.dumps({"config": cfg.to_dict(), "recipe_content": load_recipe(cfg.recipe).raw,
                                  "runs": [[r.arm, r.seed] for r in runs]}))


def _previous_state(out: str) -> dict | None:
    state_path = os.path.join(out, SWEEP_FILE)
    if not os.path.isfile(state_path):
        return None
    with open(state_path, encoding="utf-8") as f:
        return json.load(f)


def compare_finished(cfg: SweepConfig) -> dict:
    """Write the comparison of the runs finished so far and start none (``gere-hf sweep --compare``): a look at a
    sweep still running in another process, or the published part of one that could not finish. Arms with fewer
    seeds than planned show one value per seed, without an interval."""
    out = os.path.abspath(cfg.output_dir)
    if _previous_state(out) is None:
        raise SweepError(f"{out} holds no sweep yet (no {SWEEP_FILE}); run `gere-hf sweep` first.")
    runs = plan_runs(cfg)
    check_extension(_previous_state(out), _sweep_state(cfg, runs), out, what="--compare")
    check_finished_runs(cfg, runs, checked_sweep=True)
    comparison = compare(cfg, runs)
    write_comparison(cfg, comparison)
    _say(f"{sum(_finished(r) for r in runs)} of {len(runs)} runs finished; comparison of those: "
         f"{os.path.join(out, 'comparison.md')}")
    return comparison


def run_sweep(cfg: SweepConfig, resume: bool = False) -> dict:
    """Run every (arm, seed) not finished yet, ``parallel`` at a time, then write the comparison; returns it."""
    runs = plan_runs(cfg)
    out = os.path.abspath(cfg.output_dir)
    state_path = os.path.join(out, SWEEP_FILE)
    previous = _previous_state(out)
    if previous is not None and not resume:
        raise SweepError(f"{out} already holds a sweep. Pass --resume to continue it, or choose another output_dir.")
    state = _sweep_state(cfg, runs)
    if previous is not None:
        check_extension(previous, state, out)
    check_finished_runs(cfg, runs, checked_sweep=previous is not None)
    os.makedirs(out, exist_ok=True)
    write_json(state_path, state)
    cpus = os.cpu_count() or 1
    parallel = cfg.parallel or (2 if cpus >= 2 else 1)
    threads = cfg.threads or max(1, cpus // parallel)
    todo = [r for r in runs if not _finished(r)]
    _say(f"{len(runs)} runs ({len(cfg.arms)} arms × {len(cfg.seeds)} seeds), {len(runs) - len(todo)} finished "
         f"before; {parallel} at a time, {threads} thread(s) each; outputs in {out}.")
    _execute(cfg, todo, parallel, threads, total=len(runs))
    comparison = compare(cfg, runs)
    write_comparison(cfg, comparison)
    _say(f"comparison: {os.path.join(out, 'comparison.md')}")
    return comparison


def _execute(cfg: SweepConfig, todo: list[SweepRun], parallel: int, threads: int, total: int) -> None:
    pending = list(todo)
    active: dict[str, tuple[SweepRun, subprocess.Popen, float, Any]] = {}
    durations: list[float] = []
    done = total - len(todo)
    last_line = ""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                os.makedirs(run.run_dir, exist_ok=True)
                spec_path = os.path.join(run.run_dir, "sweep_spec.json")
                write_json(spec_path, _spec(cfg, run, threads))
                log = open(os.path.join(run.run_dir, "sweep.log"), "a", encoding="utf-8")  # noqa: SIM115 (closed below)
                proc = subprocess.Popen([sys.executable, "-m", "gere_hf.continual.sweep", spec_path], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
                active[run.label] = (run, proc, time.time(), log)
                _say(f"started {run.label} ({done + len(active)}/{total})")
            time.sleep(5)
            for label, (run, proc, started, log) in list(active.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del active[label]
                if code != 0:
                    for _other, p, _, other_log in active.values():
                        p.terminate()
                        other_log.close()
                    raise SweepError(f"Run {label} failed (exit status {code}); its log is "
                                     f"{os.path.join(run.run_dir, 'sweep.log')}. Fix the cause and continue with "
                                     "`gere-hf sweep ... --resume`.")
                durations.append(time.time() - started)
                done += 1
                _say(f"finished {label} in {durations[-1] / 60:.1f} min ({done}/{total})")
            line = "; ".join(f"{label}: {_progress(run)}" for label, (run, *_rest) in active.items())
            if active and line != last_line:
                eta = ""
                if durations:
                    mean = sum(durations) / len(durations)
                    left = len(pending) * mean + sum(max(mean - (time.time() - a[2]), 0) for a in active.values())
                    eta = f"; about {left / max(parallel, 1) / 60:.0f} min left"
                _say(f"running {line}{eta}")
                last_line = line
    except KeyboardInterrupt:
        for _run, proc, _started, log in active.values():
            proc.terminate()
            log.close()
        raise


# ----------------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------------


def answers_and_train_time(state: dict) -> dict:
    """From a run's run_state.json, what the comparison needs beyond results.json: the final row's right/wrong
    answers per task (the per-example tests) and the stages' training seconds. Kept in ``sweep_run.json``, so that a
    run archived without its run_state.json (``benchmarks/archive_sweep.py``) still compares in full."""
    rows = state.get("evaluation") or {}
    final = rows.get(str(len(state.get("stages") or []))) or {}
    return {"final_answers": {task: [int(c) for c in answers] for task, answers in (final.get("correct") or {}).items()},
            "train_seconds": sum(s.get("train_seconds") or 0 for s in state.get("stages") or [])}


def run_metrics(run: SweepRun) -> dict:
    """One finished run's metrics (``None`` where not measured) and its final row's right/wrong answers per task
    (empty for a run archived before ``sweep_run.json`` kept them: it joins the per-seed comparison only)."""
    with open(os.path.join(run.run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    with open(os.path.join(run.run_dir, RUN_SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    state_path = os.path.join(run.run_dir, RUN_STATE_FILE)
    if "final_answers" not in summary and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            summary.update(answers_and_train_time(json.load(f)))
    m = results.get("metrics") or {}
    general = max(results.get("general") or [{}], key=lambda g: g.get("stage", -1))
    mmlu = max(results.get("mmlu") or [{}], key=lambda x: x.get("stage", -1)) if results.get("mmlu") else {}
    news = summary.get("news") or {}
    train_seconds = summary.get("train_seconds")
    return {
        "metrics": {"ap": m.get("ap"), "bwt": m.get("bwt"), "fwt": m.get("fwt"),
                    "mean_forgetting": m.get("mean_forgetting"), "delta_nll_wiki": general.get("delta_nll_vs_base"),
                    "delta_nll_news": news.get("delta_nll_vs_base"), "mmlu": mmlu.get("accuracy"),
                    "delta_mmlu": mmlu.get("delta_vs_base"),
                    "train_minutes": None if train_seconds is None else train_seconds / 60},
        "correct": summary.get("final_answers") or {},
        "run_seconds": summary.get("seconds"),
    }


def compare(cfg: SweepConfig, runs: list[SweepRun]) -> dict:
    """Per arm, per metric: the mean and 95 % t interval over seeds; per arm against the baseline: the paired t
    interval of the difference, and for AP the per-example bootstrap and the pooled McNemar test."""
    per_run = {(r.arm, r.seed): run_metrics(r) for r in runs if _finished(r)}
    baseline = cfg.baseline_arm
    out: dict = {"config": cfg.to_dict(), "baseline": baseline, "arms": {}, "differences": {}, "per_example": {}}
    for arm in cfg.arms:
        seeds = {seed: per_run[(arm, seed)] for seed in cfg.seeds if (arm, seed) in per_run}
        entry = {"seeds": sorted(seeds), "metrics": {}}
        for name, _, _ in METRICS:
            values = {s: r["metrics"][name] for s, r in seeds.items() if r["metrics"][name] is not None}
            if values:
                entry["metrics"][name] = {"per_seed": values, **mean_interval(list(values.values())).to_dict()}
        out["arms"][arm] = entry
    for arm in cfg.arms:
        if arm == baseline:
            continue
        diffs = {}
        for name, _, _ in METRICS:
            a = out["arms"][arm]["metrics"].get(name, {}).get("per_seed", {})
            b = out["arms"][baseline]["metrics"].get(name, {}).get("per_seed", {})
            if set(a) & set(b):
                diffs[name] = paired_interval(a, b).to_dict()
        out["differences"][arm] = diffs
        seeds = [s for s in cfg.seeds if (arm, s) in per_run and (baseline, s) in per_run]
        answers_a = {s: per_run[(arm, s)]["correct"] for s in seeds}
        answers_b = {s: per_run[(baseline, s)]["correct"] for s in seeds}
        if seeds and all(answers_a[s] and answers_b[s] for s in seeds):
            pooled_a = [c for s in seeds for t in sorted(answers_a[s]) for c in answers_a[s][t]]
            pooled_b = [c for s in seeds for t in sorted(answers_b[s]) for c in answers_b[s][t]]
            out["per_example"][arm] = {
                "ap_bootstrap": paired_bootstrap(answers_a, answers_b, cfg.bootstrap_resamples).to_dict(),
                "mcnemar": mcnemar_exact(pooled_a, pooled_b),
                "examples": len(pooled_a),
            }
    return out


def _cell(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "–"
    if entry.get("half_width") is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['half_width']:.{digits}f}"


def _diff_cell(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "–"
    if entry.get("low") is None:
        return f"{entry['mean']:+.{digits}f}"
    mark = " **✓**" if entry["excludes_zero"] else ""
    return f"{entry['mean']:+.{digits}f} [{entry['low']:+.{digits}f}, {entry['high']:+.{digits}f}]{mark}"


def comparison_markdown(comparison: dict) -> str:
    """The comparison as markdown: arms (mean ± 95 % half-width over seeds) and differences from the baseline."""
    arms = comparison["arms"]
    shown = [(n, label, hib) for n, label, hib in METRICS if any(n in a["metrics"] for a in arms.values())]
    seeds = sorted({s for a in arms.values() for s in a["seeds"]})
    lines = [f"Arms: mean ± 95 % t-interval half-width over seeds {seeds} (one value per seed when a seed is "
             "missing).", "", "| arm | " + " | ".join(n for n, _, _ in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for arm, entry in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_cell(entry["metrics"].get(n), 1 if n == "train_minutes" else 3)
                                                  for n, _, _ in shown) + " |")
    lines += ["", f"Differences from `{comparison['baseline']}`, seed by seed: mean [95 % paired t-interval]; "
              "**✓** where the interval excludes 0.", "", "| arm | " + " | ".join(n for n, _, _ in shown) + " |",
              "|---|" + "---|" * len(shown)]
    for arm, diffs in comparison["differences"].items():
        lines.append(f"| {arm} − {comparison['baseline']} | "
                     + " | ".join(_diff_cell(diffs.get(n), 1 if n == "train_minutes" else 3) for n, _, _ in shown)
                     + " |")
    if comparison["per_example"]:
        lines += ["", "Final accuracies per eval example, paired (the same examples in both arms of a seed), pooled "
                  "over seeds and tasks: AP difference with a two-level bootstrap interval (seeds, then examples), "
                  "and the exact McNemar test of the discordant answers (examples as the only randomness).", "",
                  "| arm | examples | AP difference [95 % bootstrap] | right only here | right only in baseline | "
                  "McNemar p |", "|---|---|---|---|---|---|"]
        for arm, pe in comparison["per_example"].items():
            b, m = pe["ap_bootstrap"], pe["mcnemar"]
            lines.append(f"| {arm} − {comparison['baseline']} | {pe['examples']} | {_diff_cell(b)} | {m['a_only']} | "
                         f"{m['b_only']} | {m['p_value']:.3g} |")
    lines += ["", "Metrics: " + "; ".join(f"`{n}` {label}" for n, label, _ in shown) + "."]
    return "\n".join(lines) + "\n"


def write_comparison(cfg: SweepConfig, comparison: dict) -> None:
    out = os.path.abspath(cfg.output_dir)
    write_json(os.path.join(out, "comparison.json"), comparison)
    with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(f"# Sweep: {os.path.basename(cfg.recipe)}\n\n{comparison_markdown(comparison)}")
    _figure(comparison, os.path.join(out, "comparison.png"))


def _figure(comparison: dict, path: str) -> None:
    """One panel per metric: each arm's per-seed values and its mean with the 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = comparison["arms"]
    shown = [(n, label) for n, label, _ in METRICS if any(n in a["metrics"] for a in arms.values())]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 3.2), squeeze=False)
    for ax, (name, label) in zip(axes[0], shown):
        for i, (_arm, entry) in enumerate(arms.items()):
            m = entry["metrics"].get(name)
            if not m:
                continue
            ax.scatter([i] * len(m["per_seed"]), list(m["per_seed"].values()), s=12, color="0.6", zorder=2)
            err = None if m["half_width"] is None else [[m["mean"] - m["low"]], [m["high"] - m["mean"]]]
            ax.errorbar([i], [m["mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(arms)), list(arms), rotation=45, fontsize=8)
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _main(argv: list[str]) -> int:
    """``python -m gere_hf.continual.sweep SPEC.json``: one run of a sweep (what :func:`run_sweep` starts)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    run_one(spec)
    return 0


__all__ = ["SweepConfig", "SweepError", "SweepRun", "compare", "compare_finished", "comparison_markdown", "load_sweep",
           "plan_runs", "run_sweep"]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
