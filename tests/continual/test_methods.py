"""The recipe's ``method`` section (gere_hf.continual.methods): TRL's SDFT as a stage's training method, alone and with
GeRe replay, through whole 2-stage runs of the tiny recipe (random Llama, ByT5 tokenizer, CPU, one process), its
resume, and every refusal before any work."""

from __future__ import annotations

import os

import pytest
from datasets import Dataset
from recipe_utils import crash_in_stage, one_thread, read_json, record_steps, tiny_recipe

from gere_hf.continual import run_recipe
from gere_hf.continual.methods import AUTO, METHODS, MethodConfig, check_tasks
from gere_hf.continual.recipe import RecipeError, parse_recipe
from gere_hf.sdft import DEFAULT_TEACHER_TEMPLATE, GeReSDFTTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# SDFT under SDFTConfig: the tiny recipe's SFT-only max_length is nulled; short stages.
SDFT = ("method.name=sdft", "training.max_length=null", "training.max_steps=2")


def _nothing_written(out) -> bool:
    return not os.path.exists(out)


def _sdft_logs(out, index_name):
    metrics = read_json(out / "stages" / index_name / "metrics.json")
    return metrics, [h for h in metrics["log_history"] if "loss" in h]


# ----------------------------------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["none", "tm"])
def test_sdft_recipe_runs_two_stages_alone_and_with_gere(tmp_path, loss):
    out = tmp_path / "run"
    with one_thread():
        results = run_recipe(tiny_recipe(out, *SDFT, f"gere.loss={loss}"))
    state = read_json(out / "run_state.json")
    assert state["finished"] and [s["status"] for s in state["stages"]] == ["finished", "finished"]
    for stage in state["stages"]:
        assert stage["method"]["trainer"] == "GeReSDFTTrainer" and stage["method"]["name"] == "sdft"
        assert stage["method"]["teacher_model_kind"] == "base" and stage["method"]["num_generations"] == 1
        assert stage["method"]["teacher_prompt_template"] == DEFAULT_TEACHER_TEMPLATE
    assert results["run"]["training_method"] == {"name": "sdft"} and len(results["matrix"]) == 3
    assert (out / "report.md").is_file()
    for index_name in ("1-polarity", "2-trivia"):
        metrics, logs = _sdft_logs(out, index_name)
        assert metrics["training_method"]["trainer"] == "GeReSDFTTrainer"
        assert [h["step"] for h in logs] == [1, 2]
        # SDFT's own logged metrics: it generated rollouts and distilled; GeRe replay joined only with a loss.
        assert all("sdft/distillation_loss" in h and "completions/mean_length" in h for h in logs)
        if loss == "none":
            assert not any("replay_share" in h for h in logs)
        else:
            assert all(h["replay_share"] > 0 and "replay_term" in h for h in logs)
        assert (out / "stages" / index_name / "adapter_model.safetensors").is_file()


def test_auto_generation_length_is_the_longest_answer_plus_one(tmp_path):
    """'auto' max_completion_length: one token more than the stage's longest training answer, per stage; the
    rollouts stop there (the tiny random model never emits EOS)."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    longest = {}

    def answers(index, trainer):  # the stage's SDFT rows: privileged_context = prompt + completion
        rows = trainer.train_dataset
        longest[index] = max(len(tok(c[len(p):], add_special_tokens=False)["input_ids"])
                             for p, c in zip(rows["prompt"], rows["privileged_context"]))
        assert trainer.args.max_completion_length == longest[index] + 1

    out = tmp_path / "run"
    with one_thread():
        run_recipe(tiny_recipe(out, *SDFT, "gere.loss=none", "training.max_steps=1"), on_stage_end=answers)
    state = read_json(out / "run_state.json")
    assert sorted(longest) == [1, 2] and longest[1] != longest[2]
    for index, stage in enumerate(state["stages"], start=1):
        assert stage["method"]["max_completion_length"] == longest[index] + 1
        _, logs = _sdft_logs(out, stage["dir"].split("/")[-1])
        assert logs[0]["completions/max_length"] <= longest[index] + 1


RESUMABLE = (*SDFT, "training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2")


def test_sdft_resume_after_stage_one_and_a_changed_method_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = parse_recipe(tiny_recipe(out, *RESUMABLE))
    original = GeReSDFTTrainer.training_step
    crash_in_stage(monkeypatch, GeReSDFTTrainer, "2-trivia", step=2)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    state = read_json(out / "run_state.json")
    assert [s["status"] for s in state["stages"]] == ["finished", "running"]

    # The method is part of the recipe's hash: --resume under another method (or its options) is refused.
    for changed in (("method.name=sft", "training.max_length=256"), ("method.max_completion_length=4",)):
        with pytest.raises(RecipeError, match=r"(?s)different recipe.*  method\.(name|max_completion_length): "):
            run_recipe(tiny_recipe(out, *RESUMABLE, *changed), resume=True)

    monkeypatch.setattr(GeReSDFTTrainer, "training_step", original)
    trained = record_steps(monkeypatch, GeReSDFTTrainer)
    with one_thread():
        results = run_recipe(recipe, resume=True)
    assert trained == [("2-trivia", 3), ("2-trivia", 4)]  # stage 1 kept, stage 2 went on from checkpoint-2
    state = read_json(out / "run_state.json")
    assert state["finished"] and all(s["method"]["trainer"] == "GeReSDFTTrainer" for s in state["stages"])
    assert len(results["matrix"]) == 3
    _, logs = _sdft_logs(out, "2-trivia")
    assert [h["step"] for h in logs] == [1, 2, 3, 4]


def test_the_default_method_is_sft(tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path / "run"))
    assert recipe.method == MethodConfig() and recipe.method.trainer_class().__name__ == "GeReSFTTrainer"
    assert parse_recipe(tiny_recipe(tmp_path / "run", "method=sdft", "training.max_length=null")).method.name == "sdft"


# ----------------------------------------------------------------------------------------------------------------------
# Refusals, before anything is written
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (("method.name=sdtf",), r"'sdtf' is not a training method\. Did you mean 'sdft'\? Registered methods: sft: .*"
                            r"; sdft: "),
    ((*SDFT, "method.num_generationz=2"), r"Unknown key 'num_generationz' in method\. Did you mean "
                                         r"'num_generations'\?.*SDFTConfig"),
    ((*SDFT, "method.max_completion_length=long"), r"method\.max_completion_length must be .*'auto'.*got 'long'"),
    ((*SDFT, "method.num_generations=two"), r"method\.num_generations must be int, got 'two'"),
    ((*SDFT, "method.temperature=0"), r"method\.temperature must be a number > 0"),
    ((*SDFT, "method.teacher_model_kind=teacher"), r"method\.teacher_model_kind must be 'base', 'ema' or 'live'"),
    ((*SDFT, "method.teacher_prompt_template=Q {prompt}"), r"\{privileged_context\}"),
    ((*SDFT, "method.num_generations=3"), r"method\.num_generations: generation_batch_size \(4\) must be divisible"),
    (("method.name=sdft",), r"training\.max_length: method 'sdft' trains under trl\.experimental\.sdft\.SDFTConfig, "
                            r"which has no 'max_length'.*--set training\.max_length=null"),
    ((*SDFT, "stages.trivia.training={packing: true}"), r"stages\[1\] \(trivia\)\.training\.packing.*"
                                                        r"--set stages\.trivia\.training\.packing=null"),
    ((*SDFT, "gere.ce_reduction=token_mean"), r"gere\.ce_reduction must be 'sample_mean' with method sdft"),
    (("method.max_completion_length=8",), r"the method 'sft' takes no options"),
    (("method=[sdft]",), r"method must be a method name"),
])
def test_bad_method_sections_are_refused_before_any_work(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        run_recipe(tiny_recipe(out, *overrides))
    assert _nothing_written(out)


def test_sdft_refuses_a_task_without_prompt_and_completion():
    class Stage:
        name = "raw"

    class Task:
        train = Dataset.from_dict({"text": ["a"], "label": ["b"]})

    with pytest.raises(RecipeError, match=r"stages\[0\] \(raw\): method 'sdft'.*'completion', 'prompt'"):
        check_tasks(MethodConfig(name="sdft"), [Stage()], [Task()])
    check_tasks(MethodConfig(name="sft"), [Stage()], [Task()])  # SFT reads the rows as they are


def test_the_registry_and_the_sdft_defaults():
    assert list(METHODS) == ["sft", "sdft"]
    sdft = METHODS["sdft"]
    assert sdft.defaults["max_completion_length"] == AUTO and sdft.defaults["num_generations"] == 1
    assert sdft.defaults["teacher_prompt_template"] == DEFAULT_TEACHER_TEMPLATE
    # The method section takes SDFTConfig's own fields; the TrainingArguments ones stay in the training section.
    fields = sdft.option_fields()
    assert {"max_completion_length", "teacher_model_kind", "distillation_topk"} <= set(fields)
    assert "learning_rate" not in fields and "max_length" not in fields
