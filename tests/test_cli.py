# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Tests for `gere-hf cache` and `gere-hf inspect` on a tiny saved model, and one SmolLM2 integration run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPLAY_TEXTS, make_tiny_model

from gere_hf.cli import main
from gere_hf.losses import threshold_labels
from gere_hf.reference import MANIFEST, ReferenceStates

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny Llama and the ByT5 tokenizer saved with save_pretrained, as a user's local checkpoint."""
    from transformers import ByT5Tokenizer

    path = tmp_path_factory.mktemp("model") / "tiny"
    make_tiny_model().save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def replay_file(tmp_path):
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in REPLAY_TEXTS), encoding="utf-8")
    return path


def _cache_args(model, replay, out, *extra):
    return ["cache", "--model", str(model), "--replay", str(replay), "--out", str(out), "--num-samples", "20",
            "--max-length", "40", "--batch-size", "4", *extra]


def test_cache_then_inspect(saved_model, replay_file, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_cache_args(saved_model, replay_file, out, "--k", "0.75", "--extras", "hidden")) == 0
    summary = capsys.readouterr().out
    assert "samples=20 " in summary and "hidden=32 " in summary and "official_fp32_layout=" in summary

    store = ReferenceStates.open(str(out))
    assert len(store) == 20 and store.k == 0.75 and store.extras == ("hidden",)
    assert f"tokens={store.num_tokens} " in summary
    # The CLI loaded what save_pretrained wrote: the labels are those of the in-memory model.
    model = make_tiny_model()
    with torch.no_grad():
        for i in (0, len(store) - 1):
            ids = torch.from_numpy(store.input_ids(i).astype("int64"))[None]
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            assert torch.equal(store.labels(i), threshold_labels(h, store.lower, store.upper))

    assert main(["inspect", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["num_samples"] == 20 and "files" not in report["manifest"]
    assert report["manifest"]["fingerprint"] == store.fingerprint
    assert report["statistics"]["tokens"] == store.num_tokens
    assert report["statistics"]["k"] == 0.75 and report["statistics"]["extras"] == ["hidden"]

    # Running it again opens the finished store; --no-verify skips checksums only.
    assert main(_cache_args(saved_model, replay_file, out, "--k", "0.75", "--extras", "hidden")) == 0
    assert main(["inspect", "--no-verify", str(out)]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "0"], "k (the threshold width in standard deviations) must be > 0"),
        (["--extras", "logits"], "Unknown extras"),
        (["--num-samples", "500"], "has 24 non-empty texts but num_samples=500"),
        (["--text-column", "body"], "no column 'body'; its columns are ['text']"),
        (["--max-length", "1"], "max_length must be at least 2"),
    ],
)
def test_cache_bad_input_exits_2(saved_model, replay_file, tmp_path, capsys, args, message):
    out = tmp_path / "store"
    assert main(_cache_args(saved_model, replay_file, out, *args)) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # after any progress bars
    assert last.startswith("gere-hf cache: error: ") and message in last, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_cache_bad_paths_exit_2(saved_model, replay_file, tmp_path, capsys):
    assert main(_cache_args(tmp_path / "no-model", replay_file, tmp_path / "s")) == 2
    assert "gere-hf cache: error:" in capsys.readouterr().err
    assert main(_cache_args(saved_model, tmp_path / "no-replay.jsonl", tmp_path / "s")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("keep")
    assert main(_cache_args(saved_model, replay_file, tmp_path / "busy")) == 2
    assert "holds something other than a reference store" in capsys.readouterr().err
    assert os.listdir(tmp_path / "busy") == ["keep.txt"] and (tmp_path / "busy" / "keep.txt").read_text() == "keep"


def test_cache_mismatch_and_rebuild(saved_model, replay_file, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(_cache_args(saved_model, replay_file, out)) == 0
    assert main(_cache_args(saved_model, replay_file, out, "--k", "2")) == 2
    err = capsys.readouterr().err
    assert "k: store has 1.0, expected 2.0" in err and "--rebuild" in err
    assert main(_cache_args(saved_model, replay_file, out, "--k", "2", "--rebuild")) == 0
    assert ReferenceStates.open(str(out)).k == 2.0


def test_inspect_bad_store_exits_2(saved_model, replay_file, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not a reference store" in capsys.readouterr().err
    out = tmp_path / "store"
    assert main(_cache_args(saved_model, replay_file, out)) == 0
    labels = out / "labels.bin"
    labels.write_bytes(labels.read_bytes()[:-3])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    assert "labels.bin is truncated or altered" in capsys.readouterr().err


def test_console_entry_point_exit_status(tmp_path):
    """The real process: exit status 2 and the message on stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "gere_hf", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert "gere-hf inspect: error:" in result.stderr and "not a reference store" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_cache_smollm2_builds_and_reopens(smollm2, tmp_path, capsys):
    model, tokenizer = smollm2
    out = tmp_path / "smollm2"
    args = ["cache", "--model", "smollm2-135m", "--out", str(out), "--num-samples", "32", "--max-length", "128"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "samples=32 " in summary and "hidden=576 " in summary
    store = ReferenceStates.open(str(out))
    assert len(store) == 32 and store.hidden_size == 576 and int(store.lengths.max()) == 128
    assert store.manifest["bits_per_element"] == pytest.approx(2.0)
    assert (out / MANIFEST).is_file()
    # Spot-check the real model: a sample's labels equal those of a direct fp32 forward.
    with torch.no_grad():
        ids = torch.from_numpy(store.input_ids(0).astype("int64"))[None]
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    labels = store.labels(0)
    expected = threshold_labels(h, store.lower, store.upper)
    # Batched vs unpadded forward differ by float32 rounding; allow a handful of boundary flips at most.
    assert (labels != expected).float().mean() < 1e-4
    assert main(args) == 0  # reopens the finished store instead of rebuilding
    assert "samples=32 " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# `gere-hf report`: messages a user can act on (docs/reliability.md)
# ----------------------------------------------------------------------------------------------------------------------


def _results(label):
    """A minimal results.json of a finished 2-stage run, as write_report writes it."""
    from gere_hf.evaluation import continual_metrics

    matrix = [[0.5, 0.1], [0.9, 0.15], [0.8, 0.6]]
    return {"schema_version": 1, "label": label, "tasks": ["polarity", "trivia"], "stages": ["base", "polarity",
            "trivia"], "matrix": matrix, "num_stages_evaluated": 2, "metrics": continual_metrics(matrix),
            "task_info": [{"name": t, "num_train": 8, "num_eval": 4, "scoring": "loglik", "choices": [" a", " b"],
                           "meta": {}} for t in ("polarity", "trivia")]}


def _run_folder(path, results):
    path.mkdir(parents=True)
    (path / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return str(path)


@pytest.mark.parametrize("case", ["truncated", "json_list", "unfinished", "given_twice", "out_is_a_file"])
def test_report_refusals_name_the_file_and_the_fix(tmp_path, capsys, case):
    good = _run_folder(tmp_path / "good", _results("good"))
    out = []
    if case == "truncated":
        bad = _run_folder(tmp_path / "bad", json.dumps(_results("bad"))[:40])
        expected = f"{os.path.join(bad, 'results.json')} is not valid JSON ("
    elif case == "json_list":
        bad = _run_folder(tmp_path / "bad", [1, 2])
        expected = f"{os.path.join(bad, 'results.json')} holds a JSON list, not the object write_report writes"
    elif case == "unfinished":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "run_state.json").write_text(json.dumps({"finished": False, "stages": [
            {"name": "polarity", "status": "finished"}, {"name": "trivia", "status": "running"}]}))
        bad = str(tmp_path / "bad")
        expected = f"{bad} is a run that has not finished (1 of 2 stages finished); its report is written at its end. " \
                   "Finish it first: `gere-hf run RECIPE --resume`."
    elif case == "given_twice":
        bad = good + os.sep
        expected = f"The run {good} is given more than once; give each run once."
    else:
        bad = _run_folder(tmp_path / "other", _results("other"))
        (tmp_path / "cmp").write_text("mine")
        out = ["--out", str(tmp_path / "cmp")]
        expected = f"--out {tmp_path / 'cmp'} is a file. Give a folder for comparison.md and compare.png."
    assert main(["report", good, bad, *out]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_report_rows_of_runs_sharing_a_label_name_their_folders(tmp_path, capsys):
    a = _run_folder(tmp_path / "a" / "probe", _results("probe"))
    b = _run_folder(tmp_path / "b" / "probe", _results("probe"))
    assert main(["report", a, b]) == 0
    table = capsys.readouterr().out
    assert f"| probe ({a}) |" in table and f"| probe ({b}) |" in table
