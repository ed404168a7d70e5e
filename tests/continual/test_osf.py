"""OSF (PEFT's orthogonal subspace fine-tuning) as a recipe's adapter type: stacked per stage with a schedule of the
preserved rank, with GeRe replay; what each stage saves, what it changes, what is rebuilt from disk, resume, refusals.

The run trains with plain SGD: PEFT's OSF projects the *gradients* of its trainable factors onto the complement of the
preserved subspace, which keeps the weight change orthogonal to that subspace exactly under SGD only (an adaptive
optimizer rescales each entry of the projected gradient; :func:`test_adamw_moves_the_weights_into_the_preserved_subspace`
measures it, and docs/osf.md says so).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from recipe_utils import REPO_ROOT, crash_in_stage, one_thread, read_json, tiny_recipe

from gere_hf.continual import RecipeError, parse_recipe, run_recipe
from gere_hf.continual.adapters import AdapterError, check_launch, effective_rank_schedule, load_causal_lm
from gere_hf.continual.launch import sharded_launch
from gere_hf.continual.state import load_stage_model
from gere_hf.trainer import GeReSFTTrainer

OSF = "peft={peft_type: OSF, target_modules: [q_proj, v_proj]}"
STACK = "adapters={strategy: stack}"
# Two stages of 4 SGD steps with GeRe's tm loss, a checkpoint every 2 steps (the resume test stops at step 3).
RUN = (OSF, STACK, "gere.loss=tm", "evaluation.enabled=false", "training.optim=sgd", "training.learning_rate=0.5",
       "training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2")
STAGES = ("1-polarity", "2-trivia")
TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
ZERO3 = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero3.json")
INPUT_IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def _osf_layers(model) -> dict:
    return {name.split("base_model.model.", 1)[-1]: module for name, module in model.named_modules()
            if hasattr(module, "osf_svd_params")}


def _subspace_leak(layer, adapter: str = "default") -> tuple[int, float, float, float]:
    """(preserved rank, |U_high^T ΔW| / |ΔW|, |ΔW V_high^T| / |ΔW|, |ΔW|) of an OSF layer: the SVD of the weight the
    stage started from (its base layer's, frozen) against the layer's weight change."""
    weight = layer.get_base_layer().weight.detach().float()
    delta = layer.get_delta_weight(adapter).detach().float()
    u, _, vt = torch.linalg.svd(weight, full_matrices=False)
    k = layer.effective_rank[adapter]
    norm = delta.norm().item()
    return k, (u[:, :k].T @ delta).norm().item() / norm, (delta @ vt[:k].T).norm().item() / norm, norm


def _run(out, *overrides, resume=False, record=None):
    """Run the OSF recipe; ``record[t]`` gets stage t's in-memory logits and, per target matrix, its subspace leak."""

    def on_stage_end(index, trainer):
        layers = _osf_layers(trainer.model)
        record[index] = {"logits": _logits(trainer.model), "leak": {n: _subspace_leak(layers[n]) for n in TARGETS},
                         "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}

    with one_thread():
        return run_recipe(tiny_recipe(out, *RUN, *overrides), resume=resume,
                          on_stage_end=on_stage_end if record is not None else None)


@pytest.fixture(scope="module")
def osf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("osf") / "run"
    record = {}
    _run(out, record=record)
    return out, record


def test_osf_stages_preserve_the_scheduled_rank_and_change_only_its_complement(osf_run):
    out, record = osf_run
    state = read_json(out / "run_state.json")
    assert state["finished"] and state["adapters"] == {"strategy": "stack", "effective_rank_schedule": [0.3, 0.7]}
    assert read_json(out / "stages" / "1-polarity" / "metrics.json")["method"] == "OSF (stack)"
    card = (out / "stages" / "2-trivia" / "README.md").read_text()
    assert "library_name: peft" in card and "\n- osf\n" in card and "**Method:** OSF (stack)" in card
    assert "apply the adapters of stages 1..2 in order" in card
    for t, (stage, rank) in enumerate(zip(STAGES, (0.3, 0.7)), start=1):
        config = read_json(out / "stages" / stage / "adapter_config.json")
        assert config["peft_type"] == "OSF" and config["effective_rank"] == rank
        log = read_json(out / "stages" / stage / "metrics.json")["log_history"]
        assert all(h["replay_ce"] > 0 for h in log if "loss" in h)  # GeRe's replay ran beside OSF
        for name, (k, leak_u, leak_v, norm) in record[t]["leak"].items():
            assert k == int(32 * rank), name  # the tiny Llama's q_proj and v_proj are 32 x 32
            assert norm > 1e-4, name  # the stage changed the matrix ...
            assert leak_u < 1e-4 and leak_v < 1e-4, (t, name, leak_u, leak_v)  # ... orthogonally to the preserved SVD
    # Stage 2 preserves more directions: it trains fewer parameters (min_dim - k columns of U and rows of V, k values).
    assert record[2]["trainable"] < record[1]["trainable"]
    assert record[1]["trainable"] == 4 * (2 * 32 * (32 - 9) + (32 - 9))


def test_osf_stage_models_rebuilt_from_disk_equal_the_trained_ones(osf_run):
    out, record = osf_run
    base = _logits(load_causal_lm(str(out / "base_model")))
    for t in (1, 2):
        model, _ = load_stage_model(str(out), t)  # as gere-hf eval --run and the runner's evaluation rebuild it
        assert torch.allclose(_logits(model), record[t]["logits"], atol=1e-5, rtol=0), t
        merged, _ = load_stage_model(str(out), t, merge=True)
        assert torch.allclose(_logits(merged), record[t]["logits"], atol=1e-5, rtol=0), t
        assert (base - record[t]["logits"]).abs().max() > 1e-4  # training moved the model
    assert not torch.allclose(record[1]["logits"], record[2]["logits"], atol=1e-5)


def test_osf_run_resumes_from_a_checkpoint_inside_a_stage(tmp_path, osf_run, monkeypatch):
    reference, uninterrupted = osf_run
    out = tmp_path / "run"
    original = GeReSFTTrainer.training_step
    crash_in_stage(monkeypatch, GeReSFTTrainer, "2-trivia", step=2)
    with pytest.raises(KeyboardInterrupt):
        _run(out)
    assert os.path.isdir(out / "stages" / "2-trivia" / "checkpoints" / "checkpoint-2")
    monkeypatch.setattr(GeReSFTTrainer, "training_step", original)
    record = {}
    _run(out, resume=True, record=record)
    assert list(record) == [2]  # stage 1 was not trained again
    # The resumed stage ends where the uninterrupted one did, still orthogonal to its preserved subspace (the
    # gradient projection survived loading the checkpoint).
    assert torch.allclose(record[2]["logits"], uninterrupted[2]["logits"], atol=1e-5, rtol=0)
    for name, (_, leak_u, leak_v, _) in record[2]["leak"].items():
        assert leak_u < 1e-4 and leak_v < 1e-4, (name, leak_u, leak_v)
    assert read_json(out / "stages" / "2-trivia" / "adapter_config.json")["effective_rank"] == 0.7


def test_adamw_moves_the_weights_into_the_preserved_subspace():
    """PEFT's OSF projects gradients, not updates: AdamW's per-entry scaling leaves the complement (docs/osf.md)."""
    from peft import OSFConfig, get_peft_model

    from gere_hf.models import tiny_llama

    leaks = {}
    for optim in ("sgd", "adamw"):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), OSFConfig(target_modules=["q_proj"], effective_rank=0.5))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5) if optim == "sgd" else torch.optim.AdamW(params, lr=1e-3)
        for _ in range(3):
            model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        leaks[optim] = _subspace_leak(_osf_layers(model)[TARGETS[0]])[1]
    assert leaks["sgd"] < 1e-4 < 1e-2 < leaks["adamw"], leaks


# ----------------------------------------------------------------------------------------------------------------------
# The schedule and the refusals, before any work
# ----------------------------------------------------------------------------------------------------------------------

THREE = "stages=[{name: a, dataset: polarity}, {name: b, dataset: trivia}, {name: c, dataset: wiki_topic}]"


def test_schedule_defaults_and_the_recipe_hash(tmp_path):
    recipe = parse_recipe(tiny_recipe(tmp_path, OSF, STACK, THREE, small=False))
    assert effective_rank_schedule(recipe.peft, recipe.adapters, 3) == [0.3, 0.5, 0.7]  # PEFT's continual example
    assert [recipe.stage_peft(t)["effective_rank"] for t in (1, 2, 3)] == [0.3, 0.5, 0.7]
    assert recipe.peft.get("effective_rank") is None  # the recipe's own options are left as written
    fixed = parse_recipe(tiny_recipe(tmp_path, OSF, STACK, "peft.effective_rank=12"))
    assert [fixed.stage_peft(t)["effective_rank"] for t in (1, 2)] == [12, 12]
    scheduled = parse_recipe(tiny_recipe(tmp_path, OSF, STACK, "adapters.effective_rank_schedule=[0.2, 16]"))
    assert [scheduled.stage_peft(t)["effective_rank"] for t in (1, 2)] == [0.2, 16]
    other = parse_recipe(tiny_recipe(tmp_path, OSF, STACK, "adapters.effective_rank_schedule=[0.2, 17]"))
    assert len({scheduled.recipe_hash, other.recipe_hash, parse_recipe(tiny_recipe(tmp_path, OSF, STACK)).recipe_hash}) == 3
    lora = parse_recipe(tiny_recipe(tmp_path, STACK))
    assert lora.stage_peft(2) == lora.peft and effective_rank_schedule(lora.peft, lora.adapters, 2) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((OSF, "adapters=null"), r"adapters.strategy: 'continue' cannot work with peft.peft_type OSF \(the default without an adapters "
                 r"section\): .* Use adapters.strategy: stack"),
        ((OSF, "adapters={strategy: continue}"), r"'continue' cannot work with peft.peft_type OSF: .*could not grow"),
        ((OSF, STACK, "adapters.effective_rank_schedule=[0.3, 0.5, 0.7]"),
         r"effective_rank_schedule has 3 value\(s\) for 2 stage\(s\): give one preserved rank per stage"),
        ((OSF, STACK, "adapters.effective_rank_schedule=[0.3, 1.0]"),
         r"adapters.effective_rank_schedule must give each stage an absolute rank ≥ 1 \(int\) or a fraction .* in "
         r"\(0, 1\) \(float\); item 1 is 1.0 \(1.0 preserves every direction: nothing would train\)"),
        ((OSF, STACK, "adapters.effective_rank_schedule=[0, 0.5]"), r"effective_rank_schedule must give .*; item 0 is 0\."),
        ((OSF, STACK, "adapters.effective_rank_schedule=[0.3, true]"), r"effective_rank_schedule must give .*; item 1 is True\."),
        ((OSF, STACK, "adapters.effective_rank_schedule=0.5"), r"adapters.effective_rank_schedule must be list"),
        ((STACK, "adapters.effective_rank_schedule=[0.3, 0.5]"),
         r"effective_rank_schedule is OSF's preserved rank per stage, but peft.peft_type is LORA. Remove the schedule"),
        ((OSF, STACK, "peft.effective_rank=0.5", "adapters.effective_rank_schedule=[0.3, 0.5]"),
         r"peft.effective_rank and adapters.effective_rank_schedule both set the preserved rank. Keep one"),
        ((OSF, STACK, "peft.effective_rank=1.5"), r"peft.effective_rank must be an absolute rank ≥ 1 \(int\) or a"),
        ((OSF, STACK, "peft.effective_rank=high"), r"peft.effective_rank must be .*int.*float.*got 'high' \(str\)"),
        ((OSF, STACK, "peft.rank_pattern={q_proj: 0}"), r"peft.rank_pattern must be a mapping of module patterns"),
        ((OSF, STACK, "peft.r=8"), r"Unknown key 'r' in peft\..* See peft.OSFConfig for the OSF options"),
        ((STACK, "peft.effective_rank=0.5"), r"Unknown key 'effective_rank' in peft\..* See peft.LoraConfig"),
        ((STACK, "peft.peft_type=IA3"), r"peft.peft_type: recipes train LoRA or OSF adapters .* got 'IA3'. .* set it to one of LORA, OSF"),
        # LoRA's learning rate kept after switching to OSF: on the benchmark it destroyed the model (+24 nats).
        ((OSF, STACK, "training.learning_rate=2e-3"),
         r"training.learning_rate = 0.002 is too high for peft.peft_type OSF \(refused above 0.001\): .*full fine-tuning"
         r" learning rate, not LoRA's.* Set a learning rate of full fine-tuning's scale"),
        ((OSF, STACK, "stages.0.learning_rate=5e-3"), r"stages\[0\] \(polarity\).*learning_rate = 0.005 is too high "
                                                    r"for peft.peft_type OSF"),
    ],
    ids=["continue-default", "continue", "schedule-length", "schedule-one", "schedule-zero", "schedule-bool",
         "schedule-not-a-list", "schedule-with-lora", "rank-and-schedule", "rank-range", "rank-type", "rank-pattern",
         "lora-key-with-osf", "osf-key-with-lora", "unknown-type", "lora-learning-rate", "stage-learning-rate"],
)
def test_osf_refusals_before_any_work(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe(tmp_path / "never", *overrides))
    assert not (tmp_path / "never").exists()


def test_the_learning_rate_limit_is_osfs_and_adaptive_optimizers_only(tmp_path):
    parse_recipe(tiny_recipe(tmp_path / "sgd", OSF, STACK, "training.optim=sgd", "training.learning_rate=0.5"))
    parse_recipe(tiny_recipe(tmp_path / "osf", OSF, STACK, "training.learning_rate=1e-3"))
    parse_recipe(tiny_recipe(tmp_path / "lora", STACK, "training.learning_rate=2e-3"))


def test_osf_under_a_sharded_launch_is_refused_before_any_work(tmp_path):
    """FSDP loses OSF's gradient projection (tests/test_fsdp2.py::test_osf_under_fsdp2_loses_its_gradient_projection);
    ZeRO-3 partitions the weights OSF decomposes (measured: DeepSpeed fails with no trainable parameter)."""
    out = tmp_path / "fsdp"
    with pytest.raises(RecipeError, match=r"peft.peft_type OSF cannot train under FSDP: .*hooks .* are lost .* Run it "
                                          r"in one process, with DDP or with DeepSpeed ZeRO-2"):
        run_recipe(tiny_recipe(out, *RUN, "training.fsdp=full_shard"))
    assert not out.exists()
    recipe = parse_recipe(tiny_recipe(tmp_path, *RUN, f"training.deepspeed={ZERO3}"))
    assert sharded_launch(recipe, SimpleNamespace(fsdp=[])) == "ZeRO-3"
    with pytest.raises(AdapterError, match=r"OSF cannot train under ZeRO-3: .* OSF needs each target matrix whole"):
        check_launch(recipe.peft, "ZeRO-3")
    check_launch(recipe.peft, None)
    check_launch(parse_recipe(tiny_recipe(tmp_path)).peft, "FSDP")  # LoRA: no restriction
