"""Stage models across a run: one LoRA adapter continued, stacked adapters, full weights."""

from __future__ import annotations

import os

import pytest
import torch
from recipe_utils import one_thread, read_json, tiny_recipe
from safetensors.torch import load_file

from gere_hf.continual import RecipeError, parse_recipe, run_recipe
from gere_hf.continual.adapters import load_causal_lm, stage_result_model
from gere_hf.continual.state import load_stage_model

# Two optimizer steps per stage with a large learning rate: every stage visibly moves the model.
FAST = ("evaluation.enabled=false", "training.learning_rate=0.05", "training.max_steps=2")
INPUT_IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def _run(out, *overrides):
    """Run a tiny recipe; return the logits of the trained model at the end of each stage (in memory)."""
    trained = {}

    def on_stage_end(index, trainer):
        trained[index] = _logits(trainer.model)

    with one_thread():
        run_recipe(tiny_recipe(out, *FAST, *overrides), on_stage_end=on_stage_end)
    return trained


@pytest.mark.parametrize("strategy", ["continue", "stack", "full"])
def test_stage_models_rebuilt_from_disk_equal_the_trained_ones(tmp_path, strategy):
    out = tmp_path / strategy
    overrides = ("peft=null", "adapters=null") if strategy == "full" else (f"adapters.strategy={strategy}",)
    trained = _run(out, *overrides)
    base_logits = _logits(load_causal_lm(str(out / "base_model")))
    stages = [out / "stages" / "1-polarity", out / "stages" / "2-trivia"]
    for t in (1, 2):
        model, tokenizer = load_stage_model(str(out), t)
        assert torch.allclose(_logits(model), trained[t], atol=1e-5, rtol=0), t
        assert (base_logits - trained[t]).abs().max() > 1e-3  # training moved the model
        assert tokenizer.pad_token_id == 0
    assert not torch.allclose(trained[1], trained[2], atol=1e-4)
    names = set(os.listdir(stages[0]))
    if strategy == "full":
        assert "model.safetensors" in names and "adapter_model.safetensors" not in names
        return
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    first, second = (load_file(str(s / "adapter_model.safetensors")) for s in stages)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    state = read_json(out / "run_state.json")
    assert state["adapters"] == {"strategy": strategy}
    # Stage 2 on the base alone: 'continue' saved the whole adapter; 'stack' only its own increment.
    load = lambda p: load_causal_lm(p)  # noqa: E731
    alone = _logits(stage_result_model(load, str(out / "base_model"), [str(stages[1])], state["peft"], "continue"))
    if strategy == "continue":
        assert torch.allclose(alone, trained[2], atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(alone, trained[2], atol=1e-4)
        # Applying the adapters of stages 1 and 2 in order, merging both, gives stage 2's model.
        from peft import PeftModel

        model = load_causal_lm(str(out / "base_model"))
        for stage in stages:
            model = PeftModel.from_pretrained(model, str(stage)).merge_and_unload()
        assert torch.allclose(_logits(model), trained[2], atol=1e-5, rtol=0)


def test_load_stage_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No run_state.json"):
        load_stage_model(str(tmp_path), 1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text(
        '{"model": {"path": "base_model"}, "stages": [{"name": "a", "dir": "stages/1-a", "status": "finished"}, '
        '{"name": "b", "dir": "stages/2-b", "status": "running"}]}'
    )
    with pytest.raises(ValueError, match=r"Stage 2 is not finished .* 1..1 \(a; 0 is the base model\)"):
        load_stage_model(str(out), "b")
    with pytest.raises(ValueError, match="has no stage 'c'"):
        load_stage_model(str(out), "c")


def test_unknown_strategy_and_lora_options(tmp_path):
    with pytest.raises(RecipeError, match="Unknown adapters.strategy 'merge'; choose 'continue' or 'stack'"):
        parse_recipe(tiny_recipe(tmp_path, "adapters.strategy=merge"))
    with pytest.raises(RecipeError, match="Unknown key 'lora_dropuot' in peft. Did you mean 'lora_dropout'"):
        parse_recipe(tiny_recipe(tmp_path, "peft.lora_dropuot=0.1"))
