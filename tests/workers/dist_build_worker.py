# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""A 2-process reference-store build, run by tests/test_reference.py as
``torchrun --standalone --nproc_per_node 2 tests/workers/dist_build_worker.py --out DIR --log-dir DIR``.

Each rank builds the store of the tiny test model over the shared replay texts on the gloo (CPU) backend and writes
``rank{R}.json`` to ``--log-dir``: which files it wrote through the store's atomic writer, how many forwards it ran,
and the fingerprint it opened. The test compares the result with a 1-process build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from conftest import REPLAY_TEXTS, make_tiny_model  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from gere_hf.models import find_final_norm  # noqa: E402
from gere_hf.reference import ReferenceStates, builder  # noqa: E402
from gere_hf.replay import ReplaySet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    writes: list[str] = []
    atomic_write = builder.atomic_write_bytes

    def logged_write(path, data):
        writes.append(os.path.relpath(path, args.out))
        atomic_write(path, data)

    builder.atomic_write_bytes = logged_write

    model = make_tiny_model()
    forwards: list[int] = []
    _, norm = find_final_norm(model)
    norm.register_forward_hook(lambda _m, _i, out: forwards.append(out.shape[0]))

    replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=args.max_length)
    store = ReferenceStates.build(
        model, replay, args.out, batch_size=args.batch_size, chunk_size=args.chunk_size, progress=False
    )
    record = {"rank": rank, "world": world, "writes": writes, "forwards": len(forwards), "num_samples": len(store),
              "fingerprint": store.fingerprint}
    with open(os.path.join(args.log_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
