"""`gere-hf sweep` on the tiny recipe: arms × seeds in real processes, what is shared, resume after a kill, and the
comparison's numbers against a hand computation."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from recipe_utils import REPO_ROOT, SMALL, TINY_RECIPE, read_json
from scipy import stats

from gere_hf.continual.sweep import SweepError, load_sweep, plan_runs

pytestmark = pytest.mark.slow


def _sweep_file(tmp_path, **extra) -> str:
    recipe = tmp_path / "recipe.yaml"
    with open(TINY_RECIPE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    recipe.write_text(yaml.safe_dump(data))
    sweep = {"recipe": "recipe.yaml", "output_dir": str(tmp_path / "sweep"), "seeds": [0, 1], "baseline": "ce",
             "parallel": 2, "threads": 1, "news_texts": 4,
             "arms": {"none": {"gere.loss": "none", **_small()}, "ce": {"gere.loss": "ce", **_small()},
                      "tm": {"gere.loss": "tm", **_small()}}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return str(path)


def _small() -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in SMALL)}


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "gere_hf", "sweep", *args], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_a_sweep_runs_every_arm_and_seed_resumes_after_a_kill_and_compares(tmp_path):
    path = _sweep_file(tmp_path)
    runs = plan_runs(load_sweep(path))
    assert [(r.arm, r.seed) for r in runs] == [("none", 0), ("none", 1), ("ce", 0), ("ce", 1), ("tm", 0), ("tm", 1)]
    # Shared by construction: one row 0 per seed for all arms, one store per seed for ce and tm; nothing else.
    assert len({r.base_dir for r in runs}) == 2 and len({r.base_dir for r in runs if r.seed == 0}) == 1
    stores = {r.recipe["gere"].get("store_dir") for r in runs if r.arm != "none"}
    assert len(stores) == 2

    # Killed (SIGKILL, the whole process group) once the first run has finished ...
    proc = _cli(path)
    first = os.path.join(runs[0].run_dir, "sweep_run.json")
    deadline = time.time() + 600
    while not os.path.isfile(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
    assert os.path.isfile(first), proc.communicate()[0][-3000:]
    finished_before = os.path.getmtime(os.path.join(runs[0].run_dir, "results.json"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # --compare writes the comparison of what finished (one run: one value, no interval) and starts nothing ...
    finished = [r for r in runs if os.path.isfile(os.path.join(r.run_dir, "sweep_run.json"))]  # the first one or two
    peek = _cli(path, "--compare")
    out, _ = peek.communicate(timeout=120)
    assert peek.returncode == 0 and f"{len(finished)} of 6 runs finished" in out and "started" not in out, out[-3000:]
    partial = read_json(tmp_path / "sweep" / "comparison.json")
    assert partial["arms"]["none"]["metrics"]["ap"]["per_seed"] == {
        str(r.seed): read_json(os.path.join(r.run_dir, "results.json"))["metrics"]["ap"] for r in finished}
    assert not os.path.isdir(runs[2].run_dir) or not os.listdir(runs[2].run_dir)
    # ... it refuses to start over, and continues with --resume, keeping the finished run.
    again = _cli(path)
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 2 and "--resume" in out
    resumed = _cli(path, "--resume")
    out, _ = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, out[-4000:]
    assert "1 finished before" in out or "2 finished before" in out
    assert os.path.getmtime(os.path.join(runs[0].run_dir, "results.json")) == finished_before

    sweep_dir = tmp_path / "sweep"
    for seed in (0, 1):  # row 0 measured once per seed and reused by the other arms
        shared = read_json(os.path.join([r for r in runs if r.seed == seed][0].base_dir, "base_row.json"))
        for r in runs:
            if r.seed == seed:
                assert read_json(os.path.join(r.run_dir, "run_state.json"))["evaluation"]["0"]["accuracy"] == \
                    shared["accuracy"]
    comparison = read_json(sweep_dir / "comparison.json")
    # The numbers, by hand: AP per run from results.json, mean and t interval over the two seeds.
    ap = {(r.arm, r.seed): read_json(os.path.join(r.run_dir, "results.json"))["metrics"]["ap"] for r in runs}
    for arm in ("none", "ce", "tm"):
        values = [ap[(arm, 0)], ap[(arm, 1)]]
        mean = sum(values) / 2
        half = stats.t.ppf(0.975, 1) * math.sqrt(sum((v - mean) ** 2 for v in values)) / math.sqrt(2)
        got = comparison["arms"][arm]["metrics"]["ap"]
        assert got["mean"] == pytest.approx(mean) and got["half_width"] == pytest.approx(half, abs=1e-12)
    diffs = [ap[("tm", s)] - ap[("ce", s)] for s in (0, 1)]
    got = comparison["differences"]["tm"]["ap"]
    assert got["mean"] == pytest.approx(sum(diffs) / 2)
    news = read_json(os.path.join(runs[2].run_dir, "sweep_run.json"))["news"]
    assert news["num_texts"] == 4 and news["delta_nll_vs_base"] == pytest.approx(news["nll"] - news["base_nll"])
    assert comparison["arms"]["ce"]["metrics"]["delta_nll_news"]["per_seed"]["0"] == \
        pytest.approx(news["delta_nll_vs_base"])
    pe = comparison["per_example"]["tm"]
    assert pe["examples"] == 2 * 2 * 4  # seeds × tasks × eval examples
    md = (sweep_dir / "comparison.md").read_text()
    assert "| tm − ce |" in md and "McNemar" in md and (sweep_dir / "comparison.png").stat().st_size > 0


def test_the_shipped_sweep_files_plan_every_arm_and_seed():
    """Each arm of a shipped sweep file (recipes/sweep_*.yaml) is a valid recipe at every seed: what a new arm is
    checked by (CONTRIBUTING.md), without running it."""
    paths = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "sweep_*.yaml")))
    assert paths
    for path in paths:
        cfg = load_sweep(path)
        runs = plan_runs(cfg)
        assert {(r.arm, r.seed) for r in runs} == {(a, s) for a in cfg.arms for s in cfg.seeds}


def test_bad_sweep_files_are_refused_before_any_run(tmp_path):
    with pytest.raises(SweepError, match="baseline 'nope' is not an arm"):
        load_sweep(_sweep_file(tmp_path, baseline="nope"))
    with pytest.raises(SweepError, match="seeds lists a seed twice"):
        load_sweep(_sweep_file(tmp_path, seeds=[1, 1]))
    with pytest.raises(SweepError, match="Unknown key 'arm'"):
        load_sweep(_sweep_file(tmp_path, arm={}))
    bad = _sweep_file(tmp_path, arms={"ce": {"gere.loss": "cee"}})
    with pytest.raises(SweepError, match="Arm 'ce', seed 0: .*cee"):
        plan_runs(load_sweep(bad))
    assert not (tmp_path / "sweep").exists()


def test_a_resumed_sweep_keeps_its_settings_and_may_add_arms(tmp_path):
    path = _sweep_file(tmp_path, seeds=[0], baseline="none", arms={"none": {"gere.loss": "none", **_small()}})
    proc = _cli(path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    changed = _cli(path, "--resume", "--set", "news_texts=2")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 2 and "news_texts" in out and "other settings" in out
    changed = _cli(path, "--resume", "--set", "arms.none={gere.loss: ce}")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 2 and "arms.none" in out
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["config"]["seeds"] == [0]
    # Adding an arm extends the sweep: the finished run is kept, the new arm runs, the comparison has both.
    finished = os.path.getmtime(tmp_path / "sweep" / "runs" / "none" / "seed-0" / "results.json")
    extended = _cli(path, "--resume", "--set", f"arms.ce={json.dumps({'gere.loss': 'ce', **_small()})}")
    out, _ = extended.communicate(timeout=600)
    assert extended.returncode == 0, out[-3000:]
    assert os.path.getmtime(tmp_path / "sweep" / "runs" / "none" / "seed-0" / "results.json") == finished
    comparison = read_json(tmp_path / "sweep" / "comparison.json")
    assert set(comparison["arms"]) == {"none", "ce"} and comparison["per_example"]["ce"]["examples"] > 0
    # Archived as benchmarks/results keeps it (no run_state.json, no weights), the sweep compares in full: the same
    # per-seed figures, training times and per-example tests.
    archive = tmp_path / "archive"
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "archive_sweep.py"), str(tmp_path / "sweep"),
                    str(archive)], check=True)
    assert not list(archive.glob("runs/*/*/run_state.json"))
    sweep = yaml.safe_load(open(path, encoding="utf-8"))
    arms = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["config"]["arms"]
    (tmp_path / "archive.yaml").write_text(yaml.safe_dump({**sweep, "arms": arms, "output_dir": str(archive)}))
    peek = _cli(str(tmp_path / "archive.yaml"), "--compare")
    out, _ = peek.communicate(timeout=120)
    assert peek.returncode == 0, out[-3000:]
    archived = read_json(archive / "comparison.json")
    for key in ("arms", "differences", "per_example"):
        assert archived[key] == comparison[key]
    # Another baseline reads the same runs: the differences change sign, nothing is run.
    against_ce = _cli(str(tmp_path / "archive.yaml"), "--compare", "--set", "baseline=ce")
    out, _ = against_ce.communicate(timeout=120)
    assert against_ce.returncode == 0, out[-3000:]
    flipped = read_json(archive / "comparison.json")
    assert flipped["baseline"] == "ce" and set(flipped["differences"]) == {"none"}
    assert flipped["differences"]["none"]["ap"]["mean"] == pytest.approx(-comparison["differences"]["ce"]["ap"]["mean"])
    assert flipped["per_example"]["none"]["examples"] == comparison["per_example"]["ce"]["examples"]


def test_a_sweep_folder_resumes_elsewhere_and_its_recipe_is_compared_by_content(tmp_path):
    """A sweep folder and its recipe copied to another place (another checkout, an archive in benchmarks/results/)
    resume there without rerunning finished runs; a recipe whose content changed is refused, wherever it lies."""
    path = _sweep_file(tmp_path, seeds=[0], baseline="none", arms={"none": {"gere.loss": "none", **_small()}})
    proc = _cli(path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "sweep", moved / "sweep")
    shutil.copy(tmp_path / "recipe.yaml", moved / "recipe.yaml")
    sweep = yaml.safe_load(open(path, encoding="utf-8"))
    (moved / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "output_dir": str(moved / "sweep")}))
    resumed = _cli(str(moved / "sweep.yaml"), "--resume")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out[-3000:]
    assert "1 finished before" in out and "started" not in out
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["training"]["learning_rate"] = 2 * float(recipe["training"]["learning_rate"])
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    changed = _cli(str(moved / "sweep.yaml"), "--resume")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 2 and "the recipe" in out and "other settings" in out, out[-3000:]

    # A run folder copied into a fresh sweep folder (no sweep.json to vouch for it) is kept only if it was run with
    # the settings planned for it: the same recipe is reused, another is refused before anything is written.
    runs_only = tmp_path / "runs_only"
    shutil.copytree(tmp_path / "sweep" / "runs", runs_only / "sweep" / "runs")
    shutil.copy(tmp_path / "recipe.yaml", runs_only / "recipe.yaml")
    (runs_only / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "output_dir": str(runs_only / "sweep")}))
    reused = _cli(str(runs_only / "sweep.yaml"))
    out, _ = reused.communicate(timeout=120)
    assert reused.returncode == 0 and "1 finished before" in out and "started" not in out, out[-3000:]
    shutil.rmtree(runs_only / "sweep")
    shutil.copytree(tmp_path / "sweep" / "runs", runs_only / "sweep" / "runs")
    shutil.copy(moved / "recipe.yaml", runs_only / "recipe.yaml")  # the learning rate doubled
    refused = _cli(str(runs_only / "sweep.yaml"))
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "was run with other settings" in out and "learning_rate" in out, out[-3000:]
    assert not (runs_only / "sweep" / "sweep.json").exists()
    # A run that records no settings (written before they were recorded) is kept only under the sweep.json that
    # vouched for it.
    summary_path = runs_only / "sweep" / "runs" / "none" / "seed-0" / "sweep_run.json"
    summary = read_json(summary_path)
    del summary["settings"]
    summary_path.write_text(json.dumps(summary))
    shutil.copy(tmp_path / "recipe.yaml", runs_only / "recipe.yaml")
    unknown = _cli(str(runs_only / "sweep.yaml"))
    out, _ = unknown.communicate(timeout=60)
    assert unknown.returncode == 2 and "records no settings" in out, out[-3000:]
