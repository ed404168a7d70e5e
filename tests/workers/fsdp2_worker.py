# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Run by tests/test_fsdp2.py: FSDP2 (torch.distributed.fsdp.fully_shard) on CPUs, gloo, 2 processes.

Usage: fsdp2_worker.py CONFIG.json, with CONFIG keys
  out, mode: "build"  the store of a sharded tiny Llama (``peft``: a LoRA model, its base recorded), sharded the way
                      accelerate 1.15's fsdp2_prepare_model shards it (each decoder layer, the embedding, the final
                      norm with the LM head, the root);
             "train"  GeReTrainer under accelerate's own FSDP2 path (``fsdp2`` true) or plainly (false: the
                      1-process reference); ``peft``, ``bf16``, ``ga``, ``steps``, ``gradient_checkpointing``; the
                      store is built inside train().

accelerate enables FSDP only on GPUs: on a CPU its state says MULTI_CPU. Here the state is told it is FSDP (a
class-level distributed_type and the plugin accelerate would have set, mixed precision included), so that
accelerate's FSDP2 preparation, transformers' FSDP save path and GeRe run as they would on GPUs, on gloo.
Each rank writes result-rank{R}.json into ``out``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from conftest import REPLAY_TEXTS  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from gere_hf.models import find_final_norm, tiny_llama  # noqa: E402
from gere_hf.reference import ReferenceStates  # noqa: E402
from gere_hf.replay import ReplaySet  # noqa: E402

MAX_LENGTH = 48


def _model(peft: bool | str, changed_adapters: bool = False):
    model = tiny_llama(hidden_size=32, seed=0, attn_implementation="eager")
    if peft in ("osf", "osf_unprojected"):  # PEFT's OSF; "osf_unprojected" without the hooks that project its
        from peft import OSFConfig, get_peft_model  # gradients (tests/test_fsdp2.py)

        model = get_peft_model(model, OSFConfig(target_modules=["q_proj", "v_proj"], effective_rank=0.5,
                                                task_type="CAUSAL_LM"))
        if peft == "osf_unprojected":
            for module in model.modules():
                if hasattr(module, "_detach_hooks"):
                    module._detach_hooks()
        return model
    if peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        if changed_adapters:  # adapters that change the activations, so that recording the base is a real test
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.5)
    return model


def shard_like_accelerate(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(base.model.embed_tokens, mesh=mesh)
    fully_shard([find_final_norm(base)[1], base.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    return model


def build(cfg) -> dict:
    dist.init_process_group("gloo")
    model = shard_like_accelerate(_model(cfg["peft"], changed_adapters=True).eval())
    forwards = []
    find_final_norm(model)[1].register_forward_hook(lambda _m, _i, out: forwards.append(tuple(out.shape)))
    replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=MAX_LENGTH)
    store = ReferenceStates.build(model, replay, os.path.join(cfg["out"], "store"), batch_size=3, chunk_size=5,
                                  progress=False)
    param = next(model.parameters())
    return {"param_type": type(param).__name__, "model_type": type(model).__name__, "forwards": len(forwards),
            "fingerprint": store.fingerprint, "build": store.manifest["build"]}


def _force_accelerate_fsdp2():
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState.distributed_type = property(lambda self: DistributedType.FSDP, lambda self, value: None)


def train(cfg) -> dict:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from gere_hf import GeReConfig, GeReTrainer

    class FSDP2Trainer(GeReTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if not cfg["fsdp2"]:
                return
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
            )
            if self.args.bf16:
                plugin.set_mixed_precision("bf16")  # AcceleratorState does this for FSDP on GPUs
            self.accelerator.state.fsdp_plugin = plugin
            self.is_fsdp_enabled = True

    if cfg["fsdp2"]:
        _force_accelerate_fsdp2()
    tok = ByT5Tokenizer()
    ds = Dataset.from_dict({"text": [f"Q: {i} plus {i}? A: {2 * i}." for i in range(64)]})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    args = TrainingArguments(
        cfg["out"], per_device_train_batch_size=2, gradient_accumulation_steps=cfg["ga"], max_steps=cfg["steps"],
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
        learning_rate=1e-3, ddp_backend="gloo" if cfg["fsdp2"] else None, bf16=cfg.get("bf16", False),
        max_grad_norm=1.0, gradient_checkpointing=cfg.get("gradient_checkpointing", False),
    )
    texts = [f"Replay text {i}. " + "general knowledge about rivers and stars " * (1 + i % 4) for i in range(12)]
    trainer = FSDP2Trainer(
        model=_model(cfg["peft"]), args=args, train_dataset=ds, processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        replay_set=ReplaySet.from_texts(texts, tok, max_length=64),
        gere_config=GeReConfig(loss="tm", replay_per_step=4, store_dir=os.path.join(cfg["out"], "store")),
    )
    trainer.train()
    saved = os.path.join(cfg["out"], "saved")
    trainer.save_model(saved)
    rank = trainer.args.process_index
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "model_type": type(trainer.model).__name__,
        "param_type": type(next(trainer.model.parameters())).__name__,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "store_precision": trainer.gere_store.fingerprint["precision"],
        "saved": sorted(os.listdir(saved)) if rank == 0 else None,
    }


def main(path: str) -> int:
    cfg = json.load(open(path))
    torch.set_num_threads(1)
    result = build(cfg) if cfg["mode"] == "build" else train(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(cfg["out"], f"result-rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
