# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""FSDP2 on 2 CPU processes (gloo): the store build of a sharded model, and GeReTrainer under accelerate's FSDP2.

torch 2.13's ``fully_shard`` runs on CPUs with gloo; accelerate enables FSDP only on GPUs, so the trainer tests tell
its state it is FSDP (tests/workers/fsdp2_worker.py says how): accelerate's FSDP2 preparation (sharding units, mixed-precision
policy), transformers' FSDP save path and GeRe's hooks, replay forward and store build then run as on GPUs. What
this cannot show: NCCL, GPU memory, and speed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPLAY_TEXTS
from safetensors.numpy import load_file
from test_reference import build, data_files, manifest_without_build
from transformers import ByT5Tokenizer

from gere_hf.replay import ReplaySet

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "workers", "fsdp2_worker.py")
REPO_ROOT = os.path.dirname(TESTS_DIR)
TERMS = ("loss", "task_loss", "replay_ce", "replay_term", "replay_share", "replay_samples_seen")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name: str, nproc: int, **cfg) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    cfg = {"out": str(out), "peft": False, "ga": 1, "steps": 3, **cfg}
    (out / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    if nproc == 1:
        cmd = [sys.executable, WORKER, str(out / "cfg.json")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), WORKER, str(out / "cfg.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_a_2_process_fsdp2_build_equals_an_unsharded_build(tmp_path, peft):
    """Sharded weights are gathered by FSDP2's own hooks (the build calls the module), hashed whole, and every rank
    runs the same number of forwards (each one all-gathers): the store is byte-identical to a 1-process build of the
    unsharded model. With LoRA the adapters are disabled for the forward: the base model is recorded."""
    sys.path.insert(0, os.path.join(TESTS_DIR, "workers"))
    from fsdp2_worker import MAX_LENGTH, _model

    ranks = _run(tmp_path, "fsdp2", 2, mode="build", peft=peft)
    assert {r["param_type"] for r in ranks} == {"DTensor"}
    assert all(r["model_type"].startswith("FSDP") for r in ranks)
    # 24 samples in chunks of 5, batches of 3: rank 0 forwards 6 batches, rank 1 forwards 4 and 2 padding forwards.
    assert [r["forwards"] for r in ranks] == [6, 6]
    replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=MAX_LENGTH)
    single = build(_model(peft, changed_adapters=True).eval(), replay, tmp_path / "single", batch_size=3, chunk_size=5)
    store = tmp_path / "fsdp2" / "store"
    assert data_files(store) == data_files(single.path)
    assert manifest_without_build(store) == manifest_without_build(single.path)
    assert all(r["fingerprint"] == single.fingerprint for r in ranks)
    if peft:  # the base model's store, not the adapted model's
        plain = build(_model(False).eval(), replay, tmp_path / "plain", batch_size=3, chunk_size=5)
        assert data_files(store) == data_files(plain.path)


def _assert_same_logs(ref: list[dict], got: list[dict], rtol: float) -> None:
    assert len(ref) == len(got)
    for step, (a, b) in enumerate(zip(ref, got)):
        for term in TERMS:
            if term in a or term in b:
                assert b[term] == pytest.approx(a[term], rel=rtol, abs=1e-7), (step, term, a[term], b[term])


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_gere_trainer_under_accelerate_fsdp2_matches_one_process(tmp_path, peft):
    """Two FSDP2 processes against one process with twice the accumulation (the same micro-batches): the same
    logged losses and replay terms, a zero replay term at the first step (the store built inside train() records
    what the training forward computes), and a saved stage (full weights or the adapter) equal to the 1-process one."""
    fsdp = _run(tmp_path, "fsdp2", 2, mode="train", fsdp2=True, peft=peft)
    single = _run(tmp_path, "single", 1, mode="train", fsdp2=False, peft=peft, ga=2)
    assert fsdp[0]["distributed_type"] == "DistributedType.FSDP" and fsdp[0]["param_type"] == "DTensor"
    assert fsdp[0]["model_type"].startswith("FSDP")
    assert fsdp[0]["logs"][0]["replay_term"] == 0.0
    _assert_same_logs(single[0]["logs"], fsdp[0]["logs"], rtol=1e-4)
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    assert weights in fsdp[0]["saved"]
    a = load_file(str(tmp_path / "single" / "saved" / weights))
    b = load_file(str(tmp_path / "fsdp2" / "saved" / weights))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_osf_under_fsdp2_loses_its_gradient_projection(tmp_path):
    """Why recipes refuse OSF under FSDP (docs/osf.md): fully_shard replaces the parameters on which PEFT's OSF layers
    registered the hooks that project their gradients, so FSDP2 trains OSF's factors unprojected, without an error.
    The 2-process logs equal a 1-process run with the hooks removed, not the projected one. If this test fails, PEFT
    or torch may have fixed it: lift the refusal (adapters.ADAPTER_TYPES['OSF'].launches) and update docs/osf.md."""
    fsdp = _run(tmp_path, "fsdp2", 2, mode="train", fsdp2=True, peft="osf")
    unprojected = _run(tmp_path, "unprojected", 1, mode="train", fsdp2=False, peft="osf_unprojected", ga=2)
    projected = _run(tmp_path, "projected", 1, mode="train", fsdp2=False, peft="osf", ga=2)
    assert fsdp[0]["param_type"] == "DTensor"
    _assert_same_logs(unprojected[0]["logs"], fsdp[0]["logs"], rtol=1e-4)
    assert fsdp[0]["logs"][0]["grad_norm"] == pytest.approx(unprojected[0]["logs"][0]["grad_norm"], rel=1e-4)
    assert fsdp[0]["logs"][0]["grad_norm"] != pytest.approx(projected[0]["logs"][0]["grad_norm"], rel=1e-2)


@pytest.mark.slow
def test_bf16_under_fsdp2_mixed_precision_records_what_training_computes(tmp_path):
    """accelerate's FSDP2 trains in bf16 through the policy's param_dtype (no autocast): the build forwards at that
    precision too, so the replay term is exactly 0 at the first step (an autocast on top would not be)."""
    ranks = _run(tmp_path, "bf16", 2, mode="train", fsdp2=True, bf16=True)
    assert ranks[0]["store_precision"] == "bfloat16"
    assert ranks[0]["logs"][0]["replay_term"] == 0.0
    assert all(np.isfinite(h["loss"]) for h in ranks[0]["logs"])
    assert torch.tensor([h["replay_term"] for h in ranks[0]["logs"][1:]]).gt(0).all()


@pytest.mark.slow
def test_lora_in_bf16_with_gradient_checkpointing_under_fsdp2_trains(tmp_path):
    """The H200 check's LoRA recipe (2026-12-04) failed at its first backward: the store build disabled the adapters
    (PEFT turns their requires_grad off) during FSDP2's first forward, where FSDP2 fixes its mixed-precision dtypes
    from the parameters that require gradients, so the reduced bf16 gradients were never cast back to the float32
    adapters. The build now leaves requires_grad as it was."""
    ranks = _run(tmp_path, "lora_bf16_gc", 2, mode="train", fsdp2=True, peft=True, bf16=True,
                 gradient_checkpointing=True)
    logs = ranks[0]["logs"]
    assert len(logs) == 3 and logs[0]["replay_term"] == 0.0
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in logs)


def test_the_shipped_fsdp2_config_launches_fsdp2_with_full_state_dicts(monkeypatch):
    """What `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` hands the training processes, and the
    plugin accelerate builds from it there."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = os.path.join(REPO_ROOT, "recipes", "accelerate", "fsdp2.yaml")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config, "train.py"]))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and plugin.cpu_ram_efficient_loading is False
    assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules


def test_the_recipe_runner_refuses_fsdp_sharded_state_dicts():
    """With SHARDED_STATE_DICT the Trainer's save_model writes no weights: a stage could not be loaded again."""
    from types import SimpleNamespace

    from gere_hf.continual.launch import RecipeError, check_fsdp_saves_full_weights

    check_fsdp_saves_full_weights(SimpleNamespace())  # no FSDP
    check_fsdp_saves_full_weights(SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type="FULL_STATE_DICT")))
    with pytest.raises(RecipeError, match="SHARDED_STATE_DICT.*FULL_STATE_DICT"):
        check_fsdp_saves_full_weights(SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type="SHARDED_STATE_DICT")))


def test_the_next_stage_sets_fsdp_up_again_after_the_state_reset(request, monkeypatch):
    """Between stages the runner resets accelerate's state. AcceleratorState writes its FSDP type into PartialState's
    shared state, and a second AcceleratorState reading it skipped its FSDP set-up (no plugin: stage 2 of the H200
    check failed with "no attribute 'is_fsdp2'"). The launch's own type (a one-GPU launch's, here set by hand: this
    machine has no GPU) is given back on reset, and the second state has its plugin."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    from gere_hf.continual import launch

    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # what a GPU launch sets up
    launch_type = launch.launch_distributed_type()

    def stage():
        state = AcceleratorState(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2),
                                 dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)  # as Accelerator does
        return state.distributed_type, state.is_fsdp2

    assert stage() == (DistributedType.FSDP, True)
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP  # accelerate's own write
    launch.reset_accelerator_state(launch_type)
    assert stage() == (DistributedType.FSDP, True)
