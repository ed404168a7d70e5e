"""What each part of the demo costs, in CPU seconds of one thread: the basis of the demo's 15-minute sizing.

The machine this was sized on is shared (2 cores, several users), so wall-clock times swing by 3× or more. CPU
time of a single-threaded process barely depends on the other load; the wall time of an unloaded 2-thread run is
then about CPU time / (2 × parallel efficiency), and the efficiency is measured here too (``--threads 2`` on a quiet
machine). Appends one record to results/cost_model.json.

    python benchmarks/experiments/cost_model.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_result, machine  # noqa: E402


class Clock:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = round(time.process_time() - self.cpu, 2)
        self.wall = round(time.perf_counter() - self.wall, 2)


def _step_clock_class():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Appends (cpu, wall) seconds of every optimizer step to ``times``."""

        def __init__(self, times: list):
            self.times = times

        def on_step_begin(self, *args, **kwargs):
            self.clock = Clock().__enter__()

        def on_step_end(self, *args, **kwargs):
            self.clock.__exit__()
            self.times.append((self.clock.cpu, self.clock.wall))

    return StepClock


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--replay-len", type=int, default=64)
    p.add_argument("--per-step", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    from gere_hf import GeReConfig, GeReSFTTrainer
    from gere_hf.evaluation import evaluate_task, general_perplexity
    from gere_hf.evaluation.tasks import load_builtin_task
    from gere_hf.models import load_model_and_tokenizer
    from gere_hf.replay import replay_heldout_texts

    StepClock = _step_clock_class()
    base, tok = load_model_and_tokenizer("smollm2-135m")
    base.eval()
    record = {"settings": vars(args), "machine": machine(), "eval": {}, "train": {}}
    tasks = {name: load_builtin_task(name, 64, 10, seed=0) for name in ("wiki_topic", "polarity", "trivia")}
    for name, task in tasks.items():
        with Clock() as c:
            evaluate_task(base, tok, task, progress=False)
        record["eval"][f"{name}_per_example"] = {"cpu": round(c.cpu / 10, 3), "wall": round(c.wall / 10, 3)}
        print(name, "eval per example", record["eval"][f"{name}_per_example"], flush=True)
    texts = replay_heldout_texts(10)
    for max_length in (64, 128):
        with Clock() as c:
            general_perplexity(base, tok, texts, max_length=max_length, progress=False)
        record["eval"][f"general_{max_length}_per_text"] = {"cpu": round(c.cpu / 10, 3), "wall": round(c.wall / 10, 3)}
        print("general", max_length, record["eval"][f"general_{max_length}_per_text"], flush=True)

    store_dir = tempfile.mkdtemp(prefix="gere_cost_store_")
    for loss in ("none", "tm"):
        for name, task in tasks.items():
            model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"], task_type="CAUSAL_LM"))
            sft = SFTConfig(tempfile.mkdtemp(), max_steps=args.steps + 1, per_device_train_batch_size=args.bs,
                            learning_rate=1e-3, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                            disable_tqdm=True, max_length=256, logging_steps=100)
            cfg = GeReConfig(loss=loss, replay_num_samples=32, replay_max_length=args.replay_len,
                             replay_per_step=args.per_step, store_dir=store_dir)
            trainer = GeReSFTTrainer(model=model, args=sft, train_dataset=task.train, processing_class=tok,
                                     gere_config=cfg)
            times = []
            trainer.add_callback(StepClock(times))
            with Clock() as c:
                trainer.train()
            steady = times[1:]  # the first step also builds the store / warms up
            entry = {"cpu_per_step": round(sum(t[0] for t in steady) / len(steady), 2),
                     "wall_per_step": round(sum(t[1] for t in steady) / len(steady), 2),
                     "first_step_cpu": times[0][0], "total_cpu": c.cpu}
            record["train"][f"{loss}_{name}"] = entry
            print(loss, name, entry, flush=True)
    path = append_result("cost_model", record)
    print("appended to", path)
    return record


if __name__ == "__main__":
    main()
