# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Two simulated nodes without a shared filesystem, run by tests/test_multinode.py, one torchrun per node:

    torchrun --nnodes 2 --node_rank N --nproc_per_node P --master_addr 127.0.0.1 --master_port PORT \\
        tests/workers/multinode_store_worker.py --base DIR --log-dir DIR

Every node sees the store directory at its own place (``DIR/node{N}/store``), as a node-local disk would hold it.
Phase "build": the store is built by all ranks; phase "rejoin": node 1's copy is deleted (a fresh node) and the build
is called again, which must only copy rank 0's store; phase "open": the same, through ``open_distributed``.
Each rank writes rank{R}.json to ``--log-dir``: forwards per phase and the files of its node's directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from conftest import REPLAY_TEXTS, make_tiny_model  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from gere_hf.models import find_final_norm  # noqa: E402
from gere_hf.reference import ReferenceStates  # noqa: E402
from gere_hf.replay import ReplaySet  # noqa: E402


def digests(path: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, name))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, node, local_rank = dist.get_rank(), int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
    out = os.path.join(args.base, f"node{node}", "store")

    model = make_tiny_model()
    forwards: list[int] = []
    find_final_norm(model)[1].register_forward_hook(lambda _m, _i, o: forwards.append(o.shape[0]))
    replay = ReplaySet.from_texts(REPLAY_TEXTS, ByT5Tokenizer(), max_length=48)
    record = {"rank": rank, "node": node, "world": dist.get_world_size(), "phases": {}}

    def phase(name, call):
        before = len(forwards)
        store = call()
        dist.barrier()
        record["phases"][name] = {"forwards": len(forwards) - before, "files": digests(out),
                                  "building_left": os.path.isdir(os.path.join(out, ".building")),
                                  "num_samples": len(store)}
        dist.barrier()  # every rank has read its directory before node 1's copy is deleted

    def build():
        return ReferenceStates.build(model, replay, out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                                     progress=False)

    def forget_node_1():
        if node == 1 and local_rank == 0:
            shutil.rmtree(out)
        dist.barrier()

    phase("build", build)
    forget_node_1()
    phase("rejoin", build)
    forget_node_1()
    phase("open", lambda: ReferenceStates.open_distributed(out))
    with open(os.path.join(args.log_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
