"""`gere-hf run` in 2 processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, against the same recipe in 1 process.

The 1-process run uses twice the gradient accumulation of the 2-process run, so both see the same samples in every
optimizer step (rank r's micro-batch is the 1-process run's micro-batch 2m + r) and the same replay samples; the
logged training losses and the evaluation after every stage must then agree within float tolerance.

* DDP runs under ``accelerate launch --multi_gpu --num_processes 2 -m gere_hf run`` (on CPU, ``--cpu`` would start a
  single process), LoRA with the 'continue' strategy;
* ZeRO-2 runs under ``torchrun --nproc_per_node 2 -m gere_hf run``, full fine-tuning (the paper's setting);
* ZeRO-3 runs under torchrun twice: LoRA with the 'stack' strategy (merging adapters into weights ZeRO-3
  partitions) and batch interpolation (``gere.replay_per_step``), and full fine-tuning;
* ZeRO-2 also runs OSF (PEFT's orthogonal subspace fine-tuning, stacked per stage with its rank schedule; its
  gradient projection hooks under DeepSpeed's gradient partitioning).

FSDP is not tested: accelerate turns FSDP on only on GPUs/accelerators, on CPU it runs plain DDP (see
docs/compatibility.md). Each test takes about one minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from recipe_utils import REPO_ROOT, one_thread, read_json, tiny_recipe
from safetensors.torch import load_file

from gere_hf.continual import run_recipe

pytestmark = pytest.mark.slow

COMMON = ("training.learning_rate=0.01", "training.per_device_train_batch_size=2", "training.max_steps=3",
          "evaluation.general_texts=4")
VARIANTS = {
    "lora_continue": ("adapters.strategy=continue",),
    "full": ("peft=null", "adapters=null"),
    "lora_stack_bi": ("adapters.strategy=stack", "gere.replay_per_step=2"),
    # OSF at the highest rate a recipe accepts for it (full fine-tuning's scale, docs/osf.md "The learning rate").
    "osf_stack": ("peft={peft_type: OSF, target_modules: [q_proj, v_proj]}", "adapters.strategy=stack",
                  "training.learning_rate=1e-3"),
}
ZERO2 = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero2.json")
ZERO3 = os.path.join(REPO_ROOT, "recipes", "deepspeed", "zero3.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference run of each variant (gradient accumulation 2), made on first use."""
    runs = {}

    def get(variant: str):
        if variant not in runs:
            out = tmp_path_factory.mktemp("single") / variant
            with one_thread():
                run_recipe(tiny_recipe(out, *COMMON, *VARIANTS[variant], "training.gradient_accumulation_steps=2"))
            runs[variant] = out
        return runs[variant]

    return get


def _launch(tmp_path, launcher: str, variant: str, *overrides: str):
    out = tmp_path / f"{launcher}-{variant}"
    recipe = tiny_recipe(out, *COMMON, *VARIANTS[variant], "training.gradient_accumulation_steps=1", *overrides)
    path = tmp_path / f"{launcher}-{variant}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    port = str(_free_port())
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
               "127.0.0.1", "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port]
    cmd += ["-m", "gere_hf", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _losses(run_dir, stage: str) -> list[float]:
    metrics = read_json(os.path.join(run_dir, "stages", stage, "metrics.json"))
    return [h["loss"] for h in metrics["log_history"] if "loss" in h]


def _compare(single_dir, dist_dir, distributed_type: str, rtol: float) -> dict:
    """Assert the 2-process run matches the 1-process one; return the numbers compared (printed for the record)."""
    ref, got = read_json(os.path.join(single_dir, "results.json")), read_json(os.path.join(dist_dir, "results.json"))
    state = read_json(os.path.join(dist_dir, "run_state.json"))
    assert state["finished"] and state["world_size"] == 2
    assert [s["distributed_type"] for s in state["stages"]] == [distributed_type] * 2
    assert got["matrix"] == ref["matrix"]
    numbers = {"matrix": got["matrix"]}
    for a, b in zip(ref["general"], got["general"]):
        assert b["nll"] == pytest.approx(a["nll"], rel=rtol), (a, b)
    numbers["general_nll"] = [(round(a["nll"], 6), round(b["nll"], 6)) for a, b in zip(ref["general"], got["general"])]
    for stage in ("1-polarity", "2-trivia"):
        ref_losses, got_losses = _losses(single_dir, stage), _losses(dist_dir, stage)
        assert len(got_losses) == len(ref_losses) == 3
        assert got_losses == pytest.approx(ref_losses, rel=rtol), (stage, ref_losses, got_losses)
        numbers[f"loss {stage}"] = [(round(a, 5), round(b, 5)) for a, b in zip(ref_losses, got_losses)]
    # Training moved the model: the comparison is not between two untouched models.
    assert abs(got["general"][-1]["nll"] - got["general"][0]["nll"]) > 1e-4
    # Only the main process wrote: one stage folder per stage, one report.
    assert sorted(os.listdir(os.path.join(dist_dir, "stages"))) == ["1-polarity", "2-trivia"]
    print(f"\n{os.path.basename(dist_dir)} vs 1 process: {numbers}")
    return numbers


def test_ddp_accelerate_launch_matches_one_process(tmp_path, single):
    dist = _launch(tmp_path, "accelerate", "lora_continue")
    _compare(single("lora_continue"), dist, "MULTI_CPU", rtol=1e-4)


def test_deepspeed_zero2_full_finetuning_matches_one_process(tmp_path, single):
    dist = _launch(tmp_path, "torchrun", "full", f"training.deepspeed={ZERO2}")
    _compare(single("full"), dist, "DEEPSPEED", rtol=2e-3)
    assert os.path.isfile(os.path.join(dist, "stages", "2-trivia", "model.safetensors"))


def test_deepspeed_zero2_stacked_osf_matches_one_process(tmp_path, single):
    dist = _launch(tmp_path, "torchrun", "osf_stack", f"training.deepspeed={ZERO2}")
    _compare(single("osf_stack"), dist, "DEEPSPEED", rtol=2e-3)
    config = read_json(os.path.join(dist, "stages", "2-trivia", "adapter_config.json"))
    assert config["peft_type"] == "OSF" and config["effective_rank"] == 0.7
    # The losses barely feel OSF's gradient projection after 3 steps; the trained factors do (a lost projection
    # moves their entries by about the learning rate): each stage's adapter equals the 1-process one.
    for stage in ("1-polarity", "2-trivia"):
        ref = load_file(os.path.join(single("osf_stack"), "stages", stage, "adapter_model.safetensors"))
        got = load_file(os.path.join(dist, "stages", stage, "adapter_model.safetensors"))
        assert sorted(ref) == sorted(got)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_deepspeed_zero3_stacked_lora_with_batch_interpolation_matches_one_process(tmp_path, single):
    dist = _launch(tmp_path, "torchrun", "lora_stack_bi", f"training.deepspeed={ZERO3}")
    _compare(single("lora_stack_bi"), dist, "DEEPSPEED", rtol=2e-3)
    assert os.path.isfile(os.path.join(dist, "stages", "2-trivia", "adapter_model.safetensors"))


def test_deepspeed_zero3_full_finetuning_matches_one_process(tmp_path, single):
    dist = _launch(tmp_path, "torchrun", "full", f"training.deepspeed={ZERO3}")
    _compare(single("full"), dist, "DEEPSPEED", rtol=2e-3)
