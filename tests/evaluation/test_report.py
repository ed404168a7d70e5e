from __future__ import annotations

import copy
import json
import logging

import pytest

from gere_hf.evaluation import continual_metrics
from gere_hf.evaluation.report import compare_runs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_results(label, matrix, nlls, tasks=("polarity", "trivia", "wiki_topic"), fingerprint="abc123"):
    import math

    base = nlls[0]
    return {
        "schema_version": 1,
        "label": label,
        "tasks": list(tasks),
        "task_info": [{"name": t, "num_train": 100, "num_eval": 50, "scoring": "loglik", "choices": [" a", " b"],
                       "meta": {}} for t in tasks],
        "stages": ["base", *tasks],
        "matrix": matrix,
        "num_stages_evaluated": len(matrix) - 1,
        "metrics": continual_metrics(matrix),
        "general": [{"stage": t, "name": "x", "nll": n, "ppl": math.exp(n), "tokens": 1000, "num_texts": 10,
                     "delta_nll_vs_base": n - base, "ppl_ratio_vs_base": math.exp(n - base)}
                    for t, n in enumerate(nlls)],
        "general_texts": {"num_texts": 10, "fingerprint": fingerprint, "max_length": 563},
        "eval_seconds": [{"stage": t, "seconds": 1.5} for t in range(len(matrix))],
        "timings": {"train_seconds": [12.5, 13.25, 11.0], "total_seconds": 40.0},
    }


MATRIX = [[0.5, 0.1, 0.2], [0.9, 0.15, 0.25], [0.8, 0.6, 0.3], [0.7, 0.55, 0.95]]
NLLS = [2.0, 2.25, 2.5, 2.75]


def test_write_report(tmp_path):
    results = make_results("gere", MATRIX, NLLS)
    original = copy.deepcopy(results)
    paths = write_report(tmp_path / "run", results)
    assert results == original  # not mutated
    for name in ("results.json", "report.md", "accuracy_matrix.png", "general_ppl.png", "ap_per_stage.png"):
        path = tmp_path / "run" / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert paths[name] == str(path)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["matrix"] == MATRIX and saved["timings"] == results["timings"]
    assert {"torch", "transformers", "trl", "peft", "datasets", "gere_hf"} <= set(saved["versions"])

    report = (tmp_path / "run" / "report.md").read_text()
    assert "| Stage | polarity | trivia | wiki_topic | AP (seen) |" in report
    assert "| 2: trivia | 0.8000 | **0.6000** | 0.3000 | 0.7000 |" in report
    assert "| base | 0.5000 | 0.1000 | 0.2000 | – |" in report
    m = results["metrics"]
    assert f"| AP (final average accuracy) | {m['ap']:.4f} |" in report
    assert f"{m['bwt']:+.4f}" in report and f"{m['fwt']:+.4f}" in report
    assert f"{m['mean_forgetting']:.4f}" in report
    assert "| 3: wiki_topic | 2.7500 | 15.64 | +0.7500 |" in report
    assert "train_seconds" in report and "12.50, 13.25, 11.00" in report


def test_write_report_partial_and_without_general(tmp_path):
    results = make_results("partial", MATRIX, NLLS)
    results["matrix"] = MATRIX[:2] + [None, None]
    results["metrics"] = continual_metrics([row[:1] for row in MATRIX[:2]])
    results["general"] = []
    results["general_texts"] = None
    paths = write_report(tmp_path, results)
    assert "general_ppl.png" not in paths and not (tmp_path / "general_ppl.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "first 1 of 3 stages" in report and "Not measured" in report
    assert "| 2: trivia | – | – | – | – |" in report
    with pytest.raises(ValueError, match="lack the key"):
        write_report(tmp_path, {"matrix": []})


def _write_run(root, name, results):
    write_report(root / name, results)
    return root / name


def test_compare_runs(tmp_path):
    runs = [
        _write_run(tmp_path, "none", make_results("none", MATRIX, NLLS)),
        _write_run(tmp_path, "tm", make_results(None, [[0.5, 0.1, 0.2], [0.9, 0.2, 0.2], [0.85, 0.7, 0.3],
                                                       [0.8, 0.65, 0.9]], [2.0, 2.05, 2.1, 2.125])),
    ]
    table = compare_runs(runs, out_dir=tmp_path / "cmp")
    header = "| Run | Stages | AP | BWT | FWT | Mean forgetting | Final ΔNLL vs base | Final PPL |"
    assert header in table
    none_metrics = continual_metrics(MATRIX)
    assert f"| none | 3/3 | {none_metrics['ap']:.4f} | {none_metrics['bwt']:+.4f} |" in table
    assert "| tm | 3/3 | 0.7833 |" in table  # the folder name labels a run without a label
    assert "+0.7500 | 15.64 |" in table and "+0.1250 | 8.37 |" in table
    assert (tmp_path / "cmp" / "comparison.md").read_text().endswith(table)
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_runs_different_tasks(tmp_path, caplog):
    a = _write_run(tmp_path, "a", make_results("ce", MATRIX, NLLS))
    other = [[0.5, 0.5], [0.9, 0.4], [0.8, 0.9]]
    b = _write_run(tmp_path, "b", make_results("tm", other, [2.0, 2.1, 2.2], tasks=("polarity", "trivia")))
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.report"):
        table = compare_runs([a, b], out_dir=tmp_path / "cmp")
    assert "different task sequences" in caplog.text and "['polarity', 'trivia']" in caplog.text
    assert "| Run | Tasks | Stages | Final ΔNLL vs base | Final PPL |" in table
    assert "| ce | polarity → trivia → wiki_topic | 3/3 | +0.7500 | 15.64 |" in table
    assert "| tm | polarity → trivia | 2/2 | +0.2000 | 9.03 |" in table
    assert "AP" not in table.split("\n")[-2]
    assert (tmp_path / "cmp" / "compare.png").is_file()

    c = _write_run(tmp_path, "c", make_results("other-texts", MATRIX, NLLS, fingerprint="zzz"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.report"):
        table = compare_runs([a, c])
    assert "different held-out texts" in caplog.text
    assert "| Run | Stages | AP | BWT | FWT | Mean forgetting |" in table and "Final PPL" not in table
    with pytest.raises(FileNotFoundError, match="No results.json"):
        compare_runs([tmp_path / "missing"])


def test_report_says_what_was_passed_over_to_keep_evaluation_apart_from_replay():
    from gere_hf.evaluation.report import _markdown_report

    results = make_results("gere", MATRIX, NLLS)
    assert "Evaluation data kept disjoint" not in _markdown_report(results)  # not from a recipe run
    results["data_overlap"] = {
        "rule": "normalised texts overlap when equal",
        "replay": {"source": "data/general.jsonl", "seed": 0, "num_texts": 8},
        "tasks": {"polarity": {"num_eval": 50, "num_train": 100, "eval_dropped_overlap": 3}},
        "general": {"asked": 10, "source": "data/general.jsonl", "num_texts": 10, "pool": 30, "examined": 18,
                    "dropped": {"replay": 8, "tasks": 0}},
    }
    report = _markdown_report(results)
    assert "Evaluation data kept disjoint from the 8 replay texts (normalised texts overlap when equal):" in report
    assert "held-out texts: 10 taken from data/general.jsonl; of the 18 candidates examined, 8 overlapped the replay " \
           "texts and 0 the tasks' texts (passed over)." in report
    assert "Task eval examples passed over as overlapping the replay texts: `polarity` 3." in report


def _with_scoring(results, scoring, choice_eos):
    for t in results["task_info"]:
        t["scoring"], t["choice_eos"] = scoring, choice_eos
    return results


def test_compare_runs_refuses_tasks_scored_differently(tmp_path, caplog):
    from gere_hf.cli import main
    from gere_hf.evaluation.report import MixedScoringError

    loglik = _write_run(tmp_path, "loglik", _with_scoring(make_results("a", MATRIX, NLLS), "loglik", True))
    no_eos = _write_run(tmp_path, "no_eos", _with_scoring(make_results("b", MATRIX, NLLS), "loglik", False))
    generate = _write_run(tmp_path, "gen", _with_scoring(make_results("c", MATRIX, NLLS), "generate", None))
    with pytest.raises(MixedScoringError) as err:
        compare_runs([loglik, generate], out_dir=tmp_path / "cmp")
    message = str(err.value)
    assert "`polarity`: a (log-likelihood ranking, eos scored), c (generation, exact match)" in message
    assert "allow_mixed_scoring" in message and not (tmp_path / "cmp").exists()  # nothing written
    with pytest.raises(MixedScoringError, match=r"a \(log-likelihood ranking, eos scored\), b \(log-likelihood "
                       r"ranking, eos not scored\)"):
        compare_runs([loglik, no_eos])
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.report"):
        table = compare_runs([loglik, generate], allow_mixed_scoring=True)
    assert "scored tasks differently" in caplog.text and "compared anyway" in table and "| a | 3/3 |" in table
    assert main(["report", str(loglik), str(generate)]) == 2
    assert main(["report", str(loglik), str(generate), "--allow-mixed-scoring"]) == 0
    # Results written before the scoring modes: 'exact_match' is generation, a loglik choice always scored eos.
    old = make_results("old", MATRIX, NLLS)
    for t in old["task_info"]:
        t.pop("choice_eos", None)
    assert "Note" not in compare_runs([_write_run(tmp_path, "old", old), loglik])
    old_gen = _with_scoring(make_results("old_gen", MATRIX, NLLS), "exact_match", None)
    del old_gen["task_info"][0]["choice_eos"]
    assert "Note" not in compare_runs([_write_run(tmp_path, "old_gen", old_gen), generate])


def test_report_shows_scoring_and_both_eos_variants(tmp_path):
    results = _with_scoring(make_results("gere", MATRIX, NLLS), "loglik", False)
    results["task_info"][1].update(scoring="generate", choice_eos=None)
    results["choice_eos_accuracy"] = [
        {"stage": 0, "accuracy": {"polarity": {"with_eos": 0.77, "without_eos": 0.87},
                                  "wiki_topic": {"with_eos": 0.2, "without_eos": 0.2}}},
        {"stage": 1, "accuracy": {"polarity": {"with_eos": 0.9, "without_eos": 0.85},
                                  "wiki_topic": {"with_eos": 0.25, "without_eos": 0.25}}},
    ]
    write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "1. `polarity` (log-likelihood ranking, eos not scored, 50 eval / 100 train examples" in report
    assert "2. `trivia` (generation, exact match, 50 eval" in report
    assert "## Choice scores with and without the end-of-sequence token" in report
    assert "| Stage | polarity (with / without eos) |" in report  # wiki_topic: the same either way, left out
    assert "| base | 0.7700 / **0.8700** |" in report and "| 1: polarity | 0.9000 / **0.8500** |" in report
