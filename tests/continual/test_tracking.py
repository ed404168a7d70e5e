"""Tests for the tracking of a continual run (gere_hf.continual.tracking): one tracked run a stage, in one group,
continued by --resume; TensorBoard event files per stage and W&B offline runs, read back from disk.

The run also goes from nothing to a report on the files `gere-hf data long-sequence` and `gere-hf data replay` write,
with local copies in the Hub datasets' schemas standing in for the Hub (benchmark_utils.py; the Hub cannot be reached
here). W&B runs in offline mode (WANDB_MODE=offline: nothing leaves the machine); its part is skipped where wandb is
not installed (`pip install gere_hf[dev]` installs it).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct

import pytest
from benchmark_utils import write_local_copy
from recipe_utils import one_thread, read_json, tiny_recipe

from gere_hf.continual.benchmarks import build_long_sequence, stage_entries
from gere_hf.continual.recipe import RecipeError, parse_recipe
from gere_hf.continual.replay_data import build_replay_data
from gere_hf.continual.runner import run_recipe
from gere_hf.continual.tracking import TrackingConfig, stage_tracking

HAS_WANDB = importlib.util.find_spec("wandb") is not None
TRACKING_ENV = ("TENSORBOARD_LOGGING_DIR", "WANDB_RUN_ID", "WANDB_RUN_GROUP", "WANDB_RESUME", "WANDB_DIR")


def _scalars(folder: str) -> dict[str, list[int]]:
    """{tag: steps} of every scalar in the TensorBoard event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return out


def _wandb_records(path: str):
    """The records of a W&B offline run file (``run-<id>.wandb``): wandb's LevelDB-style log of protobuf Records
    (7-byte file header; 32 KiB blocks; 7-byte record headers: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        else:
            pending = chunk if kind == 2 else pending + chunk


def _wandb_runs(folder: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
        info = {"history": set()}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info.update(id=record.run.run_id, group=record.run.run_group, name=record.run.display_name)
            elif kind == "history":
                info["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        runs.append(info)
    return runs


class _Stop(RuntimeError):
    pass


@pytest.fixture
def data_dirs(tmp_path):
    """What the two `gere-hf data` commands write, from local stand-ins for the Hub."""
    src = tmp_path / "hub_standin"
    write_local_copy(src, "sst2", 24, 8)
    write_local_copy(src, "copa", 24, 8)
    tasks = str(tmp_path / "long_sequence")
    build_long_sequence(tasks, from_dir=str(src), tasks=["sst2", "copa"], progress=False)
    slim = tmp_path / "slimpajama.jsonl"
    with open(slim, "w", encoding="utf-8") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"General document {i}: " + " ".join(f"w{(i * 7 + j) % 89}" for j in range(25)),
                                "meta": {"redpajama_set_name": "RedPajamaC4"}}) + "\n")
    replay = str(tmp_path / "slimpajama")
    build_replay_data(str(slim), replay, num=12, heldout=6, progress=False)
    return tasks, replay


def test_stages_log_one_run_each_and_resume_continues_them(data_dirs, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    tasks, replay = data_dirs
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    report_to = ["tensorboard"] + (["wandb"] if HAS_WANDB else [])
    out = tmp_path / "run"
    stages = [s for s in stage_entries(tasks, "6") if s["name"] in ("sst2", "copa")]  # order 6: copa, then sst2
    recipe = tiny_recipe(out, f"training.report_to={json.dumps(report_to)}", "training.max_steps=2",
                         f"gere.replay_source={replay}/replay.jsonl", "gere.replay_num_samples=12",
                         f"evaluation.general_source={replay}/heldout.jsonl", "evaluation.general_texts=6",
                         "tracking.group=paper-group", small=False)
    recipe["stages"] = [{**s, "num_eval": 4} for s in stages]

    def stop_after_training_stage_2(index, trainer):
        if index == 2:
            raise _Stop("interrupted after stage 2's training, before it is finished")

    with one_thread(), pytest.raises(_Stop):
        run_recipe(recipe, on_stage_end=stop_after_training_stage_2)
    first = read_json(out / "run_state.json")
    assert [s["status"] for s in first["stages"]] == ["finished", "running"]
    with one_thread():
        results = run_recipe(recipe, resume=True)
    assert all(k not in os.environ for k in TRACKING_ENV)  # set for each stage only

    state = read_json(out / "run_state.json")
    names = ["tiny_cpu-1-copa", "tiny_cpu-2-sst2"]
    for entry, name, attempts in zip(state["stages"], names, (1, 2)):
        tracking = entry["tracking"]
        assert tracking["run_name"] == name and tracking["report_to"] == report_to
        folder = os.path.join(out, "tensorboard", f"{entry['index']}-{entry['name']}")
        assert tracking["tensorboard_dir"] == folder
        assert len(glob.glob(os.path.join(folder, "events.out.tfevents.*"))) == attempts
        scalars = _scalars(folder)
        assert scalars["train/loss"] == [1, 2] * attempts and "train/replay_term" in scalars
        card = open(os.path.join(out, entry["dir"], "README.md"), encoding="utf-8").read()
        assert f"TensorBoard logs in `{folder}`" in card
    assert results["run"]["stages"][1]["tracking"]["run_name"] == "tiny_cpu-2-sst2"
    assert not glob.glob(os.path.join(out, "stages", "*", "checkpoints", "runs"))  # nothing under checkpoints

    if HAS_WANDB:
        ids = [entry["tracking"]["wandb_run_id"] for entry in state["stages"]]
        assert ids[1] == first["stages"][1]["tracking"]["wandb_run_id"] and ids[0] != ids[1]  # kept for --resume
        runs = _wandb_runs(str(out))  # WANDB_DIR defaults to the run folder
        assert sorted(r["id"] for r in runs) == sorted([ids[0], ids[1], ids[1]])  # stage 2 resumed: the same run
        for run in runs:
            assert run["group"] == "paper-group" and run["name"] == names[ids.index(run["id"])]
            assert {"train/loss", "train/replay_term", "train/global_step"} <= run["history"]


def test_stage_tracking_sets_variables_for_the_stage_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_GROUP", "the user's")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)

    class Args:
        report_to = ["tensorboard", "wandb"]

    record: dict = {}
    config = TrackingConfig(run_name="{run}/{stage}", tensorboard_dir=str(tmp_path / "tb"))
    with stage_tracking(config, run="r", index=3, stage="mnli", args=Args(), record=record,
                        output_dir=str(tmp_path)):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb" / "3-mnli")
        assert os.environ["WANDB_RUN_GROUP"] == "r" and os.environ["WANDB_RESUME"] == "allow"
        assert os.environ["WANDB_RUN_ID"] == record["wandb_run_id"] and record["wandb_run_id"].startswith("r-3-mnli-")
        assert os.environ["WANDB_DIR"] == str(tmp_path / "mine")  # the user's choice stays
    assert os.environ["WANDB_RUN_GROUP"] == "the user's" and "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert "WANDB_RUN_ID" not in os.environ and record["run_name"] == "r/mnli"
    kept = record["wandb_run_id"]
    with pytest.raises(_Stop), stage_tracking(config, run="r", index=3, stage="mnli", args=Args(), record=record,
                                              output_dir=str(tmp_path)):
        raise _Stop()
    assert record["wandb_run_id"] == kept and "WANDB_RUN_ID" not in os.environ  # restored after a failure too


def test_recipe_tracking_fields(tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path, "tracking.run_name={run}_{stage}", "tracking.project=cl"))
    from gere_hf.continual.arguments import stage_training_kwargs

    kwargs = stage_training_kwargs(recipe, recipe.stages[1], 2)
    assert kwargs["run_name"] == "tiny_cpu_trivia" and kwargs["project"] == "cl"
    with pytest.raises(RecipeError, match="training.run_name is set by the recipe runner; use tracking.run_name"):
        parse_recipe(tiny_recipe(tmp_path, "training.run_name=x"))
    with pytest.raises(RecipeError, match=r"has neither \{stage\} nor \{index\}"):
        parse_recipe(tiny_recipe(tmp_path, "tracking.run_name='{run}'"))
    with pytest.raises(RecipeError, match=r"unknown placeholder\(s\) \['name'\]"):
        parse_recipe(tiny_recipe(tmp_path, "tracking.run_name={name}-{stage}"))


def test_an_integration_that_is_not_installed_is_refused_before_any_work(tmp_path):
    """report_to with a logger not installed here (MLflow is not a dependency) fails in the checks, not when stage 1's
    Trainer is built after the base model's evaluation."""
    pytest.importorskip("tensorboard")
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"training.report_to asks for \['mlflow'\], but it is not installed"):
        run_recipe(tiny_recipe(out, "training.report_to=[tensorboard, mlflow]"))
    assert not (out / "run_state.json").exists() and not (out / "stages").exists()


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_a_wandb_run_the_caller_started_is_left_alone(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    class Args:
        report_to = ["wandb"]

    users = wandb.init(project="mine", dir=str(tmp_path))
    try:
        record: dict = {}
        with stage_tracking(TrackingConfig(), run="r", index=1, stage="a", args=Args(), record=record,
                            output_dir=str(tmp_path)):
            assert "WANDB_RUN_ID" not in os.environ  # the callback logs into the caller's run
        assert wandb.run is users and "wandb_run_id" not in record  # not ended, no run of ours recorded
    finally:
        wandb.finish()
