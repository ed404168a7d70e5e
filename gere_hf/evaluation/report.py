"""Reports of a continual run: ``results.json``, ``report.md`` and figures, and comparisons across runs.

:func:`write_report` takes the results of :meth:`gere_hf.evaluation.ContinualEvaluator.results` (the schema is in
``docs/evaluation.md``); :func:`compare_runs` puts several run folders side by side (e.g. replay loss none / ce / tm).
Figures are drawn with matplotlib's Agg canvas through the object-oriented API, never touching ``pyplot``'s global
backend.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

from .mmlu import MMLU_CATEGORIES
from .tasks import CLOSED_DEFAULT_SCORING, FREE_FORM_SCORING, SCORING_MODES

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"
FIGURES = ("accuracy_matrix.png", "general_ppl.png", "ap_per_stage.png", "mmlu.png")
REPORT_FILES = (RESULTS_FILE, REPORT_FILE, *FIGURES)
"""What :func:`write_report` writes into a run folder."""
_VERSION_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "gere_hf")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (and Python's)."""
    versions = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
            if name == "gere_hf":
                try:
                    import gere_hf

                    version = getattr(gere_hf, "__version__", None)
                except ImportError:
                    pass
            versions[name] = version or "not installed"
    return versions


# ----------------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------------


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def format_number(x: Any, digits: int = 4, signed: bool = False) -> str:
    """A number as reports print it (``digits`` decimals, a sign with ``signed``); "–" for none, "inf" kept."""
    if not _num(x):
        return "–"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stage_labels(results: dict) -> list[str]:
    stages = results.get("stages") or ["base"] + list(results.get("tasks", []))
    return [name if t == 0 else f"{t}: {name}" for t, name in enumerate(stages)]


def _seen_ap(row: Sequence[float] | None, t: int) -> float | None:
    if row is None or t == 0:
        return None
    seen = [x for x in row[:t] if _num(x)]
    return sum(seen) / len(seen) if len(seen) == t else None


# ----------------------------------------------------------------------------------------------------------------------
# Task scoring
# ----------------------------------------------------------------------------------------------------------------------

def task_scoring(info: dict) -> tuple[str | None, bool | None]:
    """``(mode, choice_eos)`` of a ``task_info`` entry. Results written before the modes existed said
    ``exact_match`` for generation and always scored the eos token of a choice."""
    mode = info.get("scoring")
    mode = FREE_FORM_SCORING if mode == "exact_match" else mode
    eos = info.get("choice_eos", True if mode == CLOSED_DEFAULT_SCORING else None)
    return mode, (eos if mode in SCORING_MODES and SCORING_MODES[mode].uses_choice_eos else None)


def scoring_description(info: dict) -> str:
    """E.g. ``log-likelihood ranking, eos scored``."""
    mode, eos = task_scoring(info)
    text = SCORING_MODES[mode].title if mode in SCORING_MODES else str(mode)
    return text if eos is None else f"{text}, eos {'scored' if eos else 'not scored'}"


class RunFolderError(ValueError):
    """A run folder (or --out) that cannot be reported: the message names the file and the fix."""


class MixedScoringError(ValueError):
    """Runs whose tasks were scored differently, compared without ``allow_mixed_scoring``."""


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_accuracy_matrix(results: dict, path: str) -> None:
    import numpy as np

    tasks = list(results["tasks"])
    labels = _stage_labels(results)
    data = np.array(
        [[x if _num(x) else np.nan for x in row] if row is not None else [np.nan] * len(tasks)
         for row in results["matrix"]],
        dtype=float,
    )
    fig = _new_figure(1.6 + 1.2 * len(tasks), 1.2 + 0.5 * len(labels))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(data):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontweight="bold" if r == c + 1 else "normal", fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("task (training order)")
    ax.set_ylabel("model after stage")
    ax.set_title(f"Accuracy matrix{_title_suffix(results)}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.savefig(path, dpi=110)


def _plot_general(results: dict, path: str) -> None:
    general = results["general"]
    labels = _stage_labels(results)
    xs = [g["stage"] for g in general]
    fig = _new_figure(max(5.0, 1.0 + 0.9 * len(xs)), 3.6)
    ax = fig.add_subplot()
    ax.plot(xs, [g["ppl"] for g in general], marker="o", color="tab:blue", label="perplexity")
    ax.set_xticks(xs, [labels[x] if x < len(labels) else str(x) for x in xs], rotation=20, ha="right")
    ax.set_ylabel("held-out general perplexity")
    ax.set_title(f"General capability{_title_suffix(results)}")
    deltas = [g.get("delta_nll_vs_base") for g in general]
    if all(_num(d) for d in deltas):
        twin = ax.twinx()
        twin.bar(xs, deltas, alpha=0.25, color="tab:red", label="ΔNLL vs base")
        twin.set_ylabel("ΔNLL vs base (nats/token)")
        twin.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _plot_ap(results: dict, path: str) -> None:
    tasks = list(results["tasks"])
    matrix = results["matrix"]
    labels = _stage_labels(results)
    stages = [t for t in range(1, len(matrix)) if _seen_ap(matrix[t], t) is not None]
    fig = _new_figure(max(5.0, 1.0 + 0.9 * len(matrix)), 3.6)
    ax = fig.add_subplot()
    for j, name in enumerate(tasks):
        pts = [(t, matrix[t][j]) for t in range(len(matrix)) if matrix[t] is not None and _num(matrix[t][j])]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1, alpha=0.45, label=name)
    if stages:
        ax.plot(stages, [_seen_ap(matrix[t], t) for t in stages], marker="o", linewidth=2.5, color="black",
                label="AP (seen tasks)")
    ax.set_xticks(range(len(matrix)), labels, rotation=20, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Average accuracy over seen tasks{_title_suffix(results)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)


def _plot_mmlu(results: dict, path: str) -> None:
    rows = results["mmlu"]
    labels = _stage_labels(results)
    xs = [m["stage"] for m in rows]
    fig = _new_figure(max(5.0, 1.0 + 0.9 * len(xs)), 3.6)
    ax = fig.add_subplot()
    for name in MMLU_CATEGORIES:
        pts = [(m["stage"], m["categories"][name]["accuracy"]) for m in rows if name in (m.get("categories") or {})]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1, alpha=0.5, label=name)
    ax.errorbar(xs, [m["accuracy"] for m in rows], yerr=[m["se"] for m in rows], marker="o", linewidth=2.5,
                color="black", capsize=3, label="overall (± 1 SE)")
    chance = rows[0].get("chance")
    if _num(chance):
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xticks(xs, [labels[x] if x < len(labels) else str(x) for x in xs], rotation=20, ha="right")
    ax.set_ylabel("MMLU accuracy")
    q = results.get("mmlu_questions") or {}
    ax.set_title(f"MMLU ({q.get('formulation', '?')}, {q.get('shots', '?')}-shot, {q.get('num_questions', '?')} "
                 f"questions){_title_suffix(results)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)


def _title_suffix(results: dict) -> str:
    return f" — {results['label']}" if results.get("label") else ""


# ----------------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------------


def _check_results(results: dict) -> None:
    missing = [k for k in ("tasks", "matrix") if k not in results]
    if missing:
        raise ValueError(
            f"The results lack the key(s) {missing}; pass the dict of ContinualEvaluator.results() "
            "(schema in docs/evaluation.md)."
        )
    T = len(results["tasks"])
    if len(results["matrix"]) != T + 1:
        raise ValueError(f"The results' matrix has {len(results['matrix'])} rows; {T} tasks need {T + 1} (base + T).")


def _markdown_report(results: dict) -> str:
    tasks = list(results["tasks"])
    labels = _stage_labels(results)
    matrix = results["matrix"]
    title = results.get("label") or "continual run"
    out = [f"# Continual evaluation: {title}", ""]
    info = {t.get("name"): t for t in results.get("task_info", [])}
    out.append("Tasks in training order (stage t trains task t):")
    out.append("")
    for j, name in enumerate(tasks, 1):
        t = info.get(name, {})
        details = ", ".join(
            s for s in (
                t.get("scoring") and scoring_description(t),
                t.get("num_eval") is not None and f"{t['num_eval']} eval / {t.get('num_train', '?')} train examples",
                t.get("choices") and f"{len(t['choices'])} choices",
            ) if s
        )
        out.append(f"{j}. `{name}`" + (f" ({details})" if details else ""))
    out += ["", "## Accuracy matrix", "",
            "Row: the model after that stage (`base` = before any training); column: the task. "
            "Bold: the task just learned (R[t][t-1]). Last column: AP over the tasks seen so far.", ""]
    rows = []
    for r, row in enumerate(matrix):
        cells = [labels[r] if r < len(labels) else str(r)]
        for j in range(len(tasks)):
            value = None if row is None else row[j]
            cell = format_number(value)
            cells.append(f"**{cell}**" if r == j + 1 and _num(value) else cell)
        cells.append(format_number(_seen_ap(row, r)))
        rows.append(cells)
    out.append(markdown_table(["Stage", *tasks, "AP (seen)"], rows))
    out += _choice_eos_lines(results)

    metrics = results.get("metrics")
    out += ["", "## Continual-learning metrics", ""]
    if metrics:
        T = metrics.get("num_stages", len(tasks))
        if T < len(tasks):
            out += [f"Over the first {T} of {len(tasks)} stages (the run has not evaluated the rest).", ""]
        out.append(markdown_table(["Metric", "Value"], [
            ["AP (final average accuracy)", format_number(metrics.get("ap"))],
            ["BWT (backward transfer)", format_number(metrics.get("bwt"), signed=True)],
            ["FWT (forward transfer)", format_number(metrics.get("fwt"), signed=True)],
            ["Mean forgetting", format_number(metrics.get("mean_forgetting"))],
        ]))
        forgetting = metrics.get("forgetting") or []
        learned = metrics.get("learned") or []
        final = metrics.get("final") or []
        out += ["", markdown_table(
            ["Task", "Just learned R[j+1][j]", "Final R[T][j]", "Forgetting"],
            [[tasks[j], format_number(learned[j] if j < len(learned) else None), format_number(final[j] if j < len(final) else None),
              format_number(forgetting[j] if j < len(forgetting) else None)] for j in range(T)],
        )]
    else:
        out.append("No stage evaluated yet.")

    general = results.get("general") or []
    out += ["", "## General capability (held-out text)", ""]
    if general:
        gt = results.get("general_texts") or {}
        if gt:
            out += [f"{gt.get('num_texts', '?')} held-out texts (fingerprint `{gt.get('fingerprint', '?')}`), at most "
                    f"{gt.get('max_length', '?')} tokens each; NLL in nats per token. Lower is better; ΔNLL > 0 means "
                    "general capability was lost.", ""]
        out.append(markdown_table(
            ["Stage", "NLL", "PPL", "ΔNLL vs base", "PPL ratio vs base", "Tokens"],
            [[labels[g["stage"]] if g["stage"] < len(labels) else str(g["stage"]), format_number(g.get("nll")),
              format_number(g.get("ppl"), 2), format_number(g.get("delta_nll_vs_base"), signed=True),
              format_number(g.get("ppl_ratio_vs_base"), 4), str(g.get("tokens", "–"))] for g in general],
        ))
    else:
        out.append("Not measured (no held-out general texts were given).")
    out += _mmlu_lines(results)
    out += _data_overlap_lines(results.get("data_overlap"))

    lm_eval = [e for e in results.get("lm_eval") or [] if e.get("results")]
    if lm_eval:
        out += ["", "## lm-evaluation-harness", ""]
        keys = sorted({(task, metric) for e in lm_eval for task, ms in e["results"].items() for metric in ms})
        out.append(markdown_table(
            ["Stage"] + [f"{task} {metric}" for task, metric in keys],
            [[labels[e["stage"]] if e["stage"] < len(labels) else str(e["stage"])]
             + [format_number(e["results"].get(task, {}).get(metric)) for task, metric in keys] for e in lm_eval],
        ))

    timings = results.get("timings")
    if isinstance(timings, dict) and timings:
        out += ["", "## Timings", "", markdown_table(["Item", "Value"], [[k, _fmt_any(v)] for k, v in timings.items()])]
    seconds = results.get("eval_seconds")
    if seconds:
        out += ["", "Evaluation time per stage: "
                + ", ".join(f"{labels[s['stage']] if s['stage'] < len(labels) else s['stage']}: {s['seconds']:.1f} s"
                            for s in seconds)]

    versions = results.get("versions")
    if versions:
        out += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(out) + "\n"


def _choice_eos_lines(results: dict) -> list[str]:
    """The log-likelihood tasks' accuracy with and without the eos term, where the two differ."""
    entries = results.get("choice_eos_accuracy") or []
    tasks = [name for name in results.get("tasks", [])
             if any(name in e["accuracy"] and e["accuracy"][name]["with_eos"] != e["accuracy"][name]["without_eos"]
                    for e in entries)]
    if not entries:
        return []
    lines = ["", "## Choice scores with and without the end-of-sequence token", ""]
    if not tasks:
        return lines + ["The log-likelihood tasks rank their choices the same with and without the eos term."]
    labels = _stage_labels(results)
    used = {t.get("name"): t.get("choice_eos") for t in results.get("task_info", [])}
    lines += ["Accuracy when the eos token TRL trains after the completion is part of a choice's score / when it is "
              "not (both from the same forward passes). Bold: the variant this run's matrix uses. The difference is "
              "what the stop token alone does.", ""]
    rows = []
    for e in entries:
        cells = [labels[e["stage"]] if e["stage"] < len(labels) else str(e["stage"])]
        for name in tasks:
            acc = e["accuracy"].get(name)
            if acc is None:
                cells.append("–")
                continue
            with_eos, without = format_number(acc["with_eos"]), format_number(acc["without_eos"])
            if used.get(name) is True:
                with_eos = f"**{with_eos}**"
            elif used.get(name) is False:
                without = f"**{without}**"
            cells.append(f"{with_eos} / {without}")
        rows.append(cells)
    return lines + [markdown_table(["Stage", *(f"{n} (with / without eos)" for n in tasks)], rows)]


def acc_se(entry: dict | None, digits: int = 4) -> str:
    """``accuracy ± se`` of an MMLU-style entry; "–" for none."""
    if not entry or not _num(entry.get("accuracy")):
        return "–"
    return f"{entry['accuracy']:.{digits}f} ± {entry['se']:.{digits}f}" if _num(entry.get("se")) else format_number(
        entry["accuracy"], digits)


def _mmlu_lines(results: dict) -> list[str]:
    rows = results.get("mmlu") or []
    if not rows:
        return []
    labels = _stage_labels(results)
    q = results.get("mmlu_questions") or {}
    shots_from = {"dev": " (exemplars from the dev split)",
                  "test": " (exemplars: the first of each subject's test questions, not scored)"}.get(
        q.get("shots_from"), "")
    out = ["", "## MMLU (general knowledge)", "",
           f"{q.get('num_questions', '?')} MMLU test questions from `{q.get('source', '?')}`, stratified by subject "
           f"(seed {q.get('seed', '?')}, fingerprint `{q.get('fingerprint', '?')}`), {q.get('shots', 0)}-shot"
           f"{shots_from}, {q.get('formulation', '?')} form. Accuracy over questions ± its binomial standard error; "
           f"chance is {format_number(rows[0].get('chance'), 2)}. Macro: the mean over subjects.", ""]
    header = ["Stage", "Accuracy", "Δ vs base", "Macro", *MMLU_CATEGORIES]
    table = []
    for m in rows:
        cats = m.get("categories") or {}
        table.append([labels[m["stage"]] if m["stage"] < len(labels) else str(m["stage"]), acc_se(m),
                      format_number(m.get("delta_vs_base"), signed=True),
                      acc_se({"accuracy": m.get("macro_accuracy"), "se": m.get("macro_se")}),
                      *[acc_se(cats.get(c), 3) for c in MMLU_CATEGORIES]])
    out.append(markdown_table(header, table))
    return out


def _data_overlap_lines(overlap: Any) -> list[str]:
    """What the recipe runner passed over to keep the evaluation data apart from the replay texts."""
    if not isinstance(overlap, dict):
        return []
    replay = overlap.get("replay") or {}
    lines = ["", "Evaluation data kept disjoint from the "
             + (f"{replay['num_texts']} replay texts" if replay.get("num_texts") is not None else "replay texts")
             + f" ({overlap.get('rule', 'by content')}):"]
    general = overlap.get("general")
    if isinstance(general, dict):
        dropped = general.get("dropped") or {}
        lines.append(f"held-out texts: {general.get('num_texts')} taken from {general.get('source')}; of the "
                     f"{general.get('examined')} candidates examined, {dropped.get('replay', 0)} overlapped the replay "
                     f"texts and {dropped.get('tasks', 0)} the tasks' texts (passed over).")
    mmlu = overlap.get("mmlu")
    if isinstance(mmlu, dict):
        dropped = mmlu.get("dropped") or {}
        lines.append(f"MMLU: {mmlu.get('num_questions')} questions of {mmlu.get('pool')}; "
                     f"{dropped.get('replay', 0)} overlapping the replay texts and {dropped.get('tasks', 0)} the tasks' "
                     "texts passed over.")
    tasks = overlap.get("tasks") or {}
    if tasks:
        lines.append("Task eval examples passed over as overlapping the replay texts: "
                     + ", ".join(f"`{name}` {_fmt_any(t.get('eval_dropped_overlap'))}" for name, t in tasks.items())
                     + ".")
    return lines


def _fmt_any(value: Any) -> str:
    if _num(value):
        return format_number(value, 2) if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_any(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt_any(v)}" for k, v in value.items())
    return str(value)


def write_report(run_dir: str | os.PathLike, results: dict) -> dict[str, str]:
    """Write ``results.json``, ``report.md`` and the figures of one run into ``run_dir``.

    ``results.json`` is ``results`` plus ``versions`` (torch, transformers, trl, peft, datasets, accelerate, gere_hf,
    python); ``timings`` and any other keys given are kept. Figures: ``accuracy_matrix.png`` (heatmap),
    ``ap_per_stage.png`` (AP over the seen tasks after each stage, with each task's curve) and ``general_ppl.png``
    (held-out perplexity and ΔNLL per stage; only when general texts were measured) and ``mmlu.png`` (MMLU accuracy
    per stage with ±1 SE bars and the four categories; only when MMLU was measured).

    Returns ``{"results": path, "report": path, <figure name>: path, ...}``.
    """
    _check_results(results)
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    results = copy.deepcopy(results)
    results["versions"] = {**package_versions(), **(results.get("versions") or {})}
    paths = {"results": os.path.join(run_dir, RESULTS_FILE), "report": os.path.join(run_dir, REPORT_FILE)}
    with open(paths["results"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(_markdown_report(results))
    figures = [("accuracy_matrix.png", _plot_accuracy_matrix), ("ap_per_stage.png", _plot_ap)]
    if results.get("general"):
        figures.append(("general_ppl.png", _plot_general))
    if results.get("mmlu"):
        figures.append(("mmlu.png", _plot_mmlu))
    for name, plot in figures:
        path = os.path.join(run_dir, name)
        plot(results, path)
        paths[name] = path
    logger.info("Wrote the report of %s to %s", results.get("label") or "the run", run_dir)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Several runs
# ----------------------------------------------------------------------------------------------------------------------


def load_results(run_dir: str | os.PathLike) -> dict:
    """The ``results.json`` of a run folder (or the file itself)."""
    path = os.fspath(run_dir)
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    if not os.path.isfile(path):
        state = _unfinished_run(os.path.dirname(path))
        if state is not None:
            raise RunFolderError(f"{os.path.dirname(path)} is a run that has not finished ({state}); its report is written "
                             "at its end. Finish it first: `gere-hf run RECIPE --resume`.")
        raise FileNotFoundError(
            f"No {RESULTS_FILE} at {path!r}. Give run folders written by write_report (the recipe's output_dir)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}): it was cut short or edited. Rewrite it from the run "
                         "(`gere-hf run RECIPE --resume` writes the report again) or restore it.") from None
    if not isinstance(results, dict):
        raise RunFolderError(f"{path} holds a JSON {type(results).__name__}, not the object write_report writes. Give "
                         "run folders written by `gere-hf run`.")
    return results


def _unfinished_run(folder: str) -> str | None:
    """How far an unfinished run is (``1 of 2 stages finished``), from its run_state.json; None if it is no run or
    has finished."""
    try:
        with open(os.path.join(folder, "run_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        stages = state["stages"]
        done = sum(1 for s in stages if s.get("status") == "finished")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None if state.get("finished") else f"{done} of {len(stages)} stages finished"


def _final_general(results: dict) -> dict:
    general = results.get("general") or []
    return max(general, key=lambda g: g["stage"]) if general else {}


def _final_mmlu(results: dict) -> dict:
    rows = results.get("mmlu") or []
    return max(rows, key=lambda m: m["stage"]) if rows else {}


# The header every MMLU prompt began with before each form took lm-evaluation-harness's own (results without "header").
_MMLU_HEADER_OF_OLDER_RESULTS = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_key(results: dict) -> tuple | None:
    """What must agree for two runs' MMLU to compare: the questions and exemplars (fingerprint), the form and the
    prompts' header (the cloze form's moved option scores by up to 4 nats when it changed)."""
    if not results.get("mmlu"):
        return None
    q = results.get("mmlu_questions") or {}
    return q.get("fingerprint"), q.get("formulation"), q.get("header", _MMLU_HEADER_OF_OLDER_RESULTS)


_METRIC_COLUMNS = (("AP", "ap", False), ("BWT", "bwt", True), ("FWT", "fwt", True),
                   ("Mean forgetting", "mean_forgetting", False))


def compare_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    allow_mixed_scoring: bool = False,
) -> str:
    """A Markdown table comparing runs: one row per run, columns AP, BWT, FWT, mean forgetting, final ΔNLL (general
    text, vs base), final PPL, and final MMLU accuracy ± SE with its change from the base model (when every run
    measured MMLU on the same questions in the same form). Each run is labelled by ``results["label"]`` or its
    folder name (or ``labels``).

    Runs over different task sequences are compared on what they share: a warning says what differs and the task
    metrics are left out (general retention is still compared when the held-out texts match). Runs over the same tasks
    scored differently (mode, or whether a choice's eos token counts) raise :class:`MixedScoringError` naming the runs
    and the modes, unless ``allow_mixed_scoring`` (then a note says so). With ``out_dir`` the table is written to
    ``comparison.md`` and the figure ``compare.png`` next to it: bars of the final figures and, below, per-stage
    curves with one line per run (general ΔNLL, MMLU, AP over the seen tasks).
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run folder.")
    folders = [os.path.realpath(os.fspath(d)) for d in run_dirs]
    twice = sorted({d for d in folders if folders.count(d) > 1})
    if twice:
        raise RunFolderError(f"The run {twice[0]} is given more than once; give each run once.")
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunFolderError(f"--out {os.fspath(out_dir)} is a file. Give a folder for comparison.md and compare.png.")
    runs = [load_results(d) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"Got {len(labels)} labels for {len(runs)} runs.")
    names = list(labels) if labels is not None else [
        r.get("label") or os.path.basename(os.path.normpath(os.fspath(d))) for r, d in zip(runs, run_dirs)
    ]
    shared = {name for name in names if names.count(name) > 1}
    # Runs that share a label are told apart by their folders, as given.
    names = [f"{name} ({os.path.normpath(os.fspath(d))})" if name in shared else name for name, d in zip(names, run_dirs)]

    notes = []
    sequences = [tuple(r.get("tasks", [])) for r in runs]
    same_tasks = len(set(sequences)) == 1
    if not same_tasks:
        described = "; ".join(f"{n}: {list(s)}" for n, s in zip(names, sequences))
        message = (f"The runs have different task sequences ({described}); AP, BWT, FWT and forgetting are not "
                   "comparable and are left out.")
        logger.warning(message)
        notes.append(message)
    if same_tasks:
        mixed = _mixed_scoring(names, runs)
        if mixed:
            message = "The runs scored tasks differently, so their accuracies are not comparable: " + "; ".join(mixed)
            if not allow_mixed_scoring:
                raise MixedScoringError(message + ". Evaluate them alike, or pass allow_mixed_scoring=True "
                                        "(`gere-hf report --allow-mixed-scoring`) to compare them anyway.")
            message += " (compared anyway: allow_mixed_scoring)."
            logger.warning(message)
            notes.append(message)
    stages_done = [(r.get("metrics") or {}).get("num_stages", 0) for r in runs]
    if same_tasks and len(set(stages_done)) > 1:
        message = (f"The runs evaluated different numbers of stages ({dict(zip(names, stages_done))}); their metrics "
                   "cover different stages.")
        logger.warning(message)
        notes.append(message)
    fingerprints = [(r.get("general_texts") or {}).get("fingerprint") for r in runs]
    has_general = all(r.get("general") for r in runs)
    same_general = has_general and len(set(fingerprints)) == 1
    if has_general and not same_general:
        message = (f"The runs measured general retention on different held-out texts (fingerprints "
                   f"{dict(zip(names, fingerprints))}); the general columns are left out.")
        logger.warning(message)
        notes.append(message)
    elif not has_general and any(r.get("general") for r in runs):
        notes.append("Some runs have no general-text measurement; the general columns are left out.")

    mmlu_keys = [_mmlu_key(r) for r in runs]
    has_mmlu = all(k is not None for k in mmlu_keys)
    same_mmlu = has_mmlu and len(set(mmlu_keys)) == 1
    if has_mmlu and not same_mmlu:
        message = (f"The runs measured MMLU on different questions, forms or prompt headers "
                   f"({dict(zip(names, mmlu_keys))}); the MMLU columns are left out.")
        logger.warning(message)
        notes.append(message)
    elif not has_mmlu and any(mmlu_keys):
        notes.append("Some runs have no MMLU measurement; the MMLU columns are left out.")

    header = ["Run", "Stages"]
    if not same_tasks:
        header.insert(1, "Tasks")
    metric_columns = _METRIC_COLUMNS if same_tasks else ()
    header += [name for name, _, _ in metric_columns]
    if same_general:
        header += ["Final ΔNLL vs base", "Final PPL"]
    if same_mmlu:
        header += ["Final MMLU", "ΔMMLU vs base"]
    rows = []
    for name, r, done in zip(names, runs, stages_done):
        metrics = r.get("metrics") or {}
        row = [name, f"{done}/{len(r.get('tasks', []))}"]
        if not same_tasks:
            row.insert(1, " → ".join(r.get("tasks", [])))
        row += [format_number(metrics.get(key), signed=signed) for _, key, signed in metric_columns]
        if same_general:
            final = _final_general(r)
            row += [format_number(final.get("delta_nll_vs_base"), signed=True), format_number(final.get("ppl"), 2)]
        if same_mmlu:
            final = _final_mmlu(r)
            row += [acc_se(final), format_number(final.get("delta_vs_base"), signed=True)]
        rows.append(row)
    table = markdown_table(header, rows)
    text = "\n".join([*(f"> **Note:** {n}" for n in notes), *([""] if notes else []), table]) + "\n"

    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, COMPARISON_FILE), "w", encoding="utf-8") as f:
            f.write("# Run comparison\n\n" + text)
        panels = [(title, [(r.get("metrics") or {}).get(key) for r in runs]) for title, key, _ in metric_columns]
        if same_general:
            panels.append(("Final ΔNLL vs base", [_final_general(r).get("delta_nll_vs_base") for r in runs]))
            panels.append(("Final PPL", [_final_general(r).get("ppl") for r in runs]))
        if same_mmlu:
            panels.append(("Final MMLU", [_final_mmlu(r).get("accuracy") for r in runs]))
        curves = _stage_curves(runs, same_tasks, same_general, same_mmlu)
        _plot_comparison(names, panels, os.path.join(out_dir, "compare.png"), curves, _stage_labels(runs[0]))
    return text


def _mixed_scoring(names: list[str], runs: list[dict]) -> list[str]:
    """Per task scored differently across runs: ``task: run (mode), run (mode)``."""
    per_run = [{t.get("name"): scoring_description(t) for t in r.get("task_info") or []} for r in runs]
    out = []
    for task in runs[0].get("tasks", []):
        described = [p.get(task, "not recorded") for p in per_run]
        if len(set(described)) > 1:
            out.append(f"`{task}`: " + ", ".join(f"{n} ({d})" for n, d in zip(names, described)))
    return out


def _stage_curves(runs: list[dict], same_tasks: bool, same_general: bool, same_mmlu: bool) -> list[tuple]:
    """Per-stage curves, one line per run, as papers plot forgetting: ``(title, [[(stage, value, se)] per run])``."""
    curves = []
    if same_general:
        curves.append(("General ΔNLL vs base (↓)", [
            [(g["stage"], g.get("delta_nll_vs_base"), None) for g in r.get("general") or []] for r in runs]))
    if same_mmlu:
        curves.append(("MMLU accuracy (± 1 SE)", [
            [(m["stage"], m.get("accuracy"), m.get("se")) for m in r.get("mmlu") or []] for r in runs]))
    if same_tasks:
        curves.append(("AP over the seen tasks", [
            [(t, _seen_ap(row, t), None) for t, row in enumerate(r.get("matrix") or []) if t > 0] for r in runs]))
    return curves


def _plot_comparison(names: list[str], panels: list[tuple[str, list]], path: str, curves: Sequence[tuple] = (),
                     stage_labels: Sequence[str] = ()) -> None:
    """Bars of the final figures (top row) and, below, the per-stage curves of every run."""
    panels = panels or [("(nothing comparable)", [None] * len(names))]
    columns = max(len(panels), len(curves))
    fig = _new_figure(max(4.0, 2.6 * columns), 3.4 * (2 if curves else 1))
    grid = fig.subplots(2 if curves else 1, columns, squeeze=False)
    axes = grid[0]
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax in list(axes[len(panels):]) + (list(grid[1][len(curves):]) if curves else []):
        ax.set_visible(False)
    for ax, (title, per_run) in zip(grid[1] if curves else [], curves):
        for name, color, points in zip(names, colors, per_run):
            points = [(x, y, e) for x, y, e in points if _num(y) and not math.isinf(y)]
            if not points:
                continue
            xs, ys, es = zip(*points)
            ax.plot(xs, ys, marker="o", color=color, label=name)
            if all(_num(e) for e in es):
                ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], color=color,
                                alpha=0.15)
        if stage_labels:
            ax.set_xticks(range(len(stage_labels)), stage_labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax, (title, values) in zip(axes, panels):
        heights = [v if _num(v) and not math.isinf(v) else 0.0 for v in values]
        ax.bar(range(len(names)), heights, color=colors)
        for i, v in enumerate(values):
            ax.text(i, heights[i], format_number(v, 3), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
