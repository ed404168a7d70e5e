# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Two nodes on this machine, without a shared filesystem: two torchrun invocations (--nnodes 2, --node_rank 0/1)
in parallel on 127.0.0.1, each node seeing the store directory at its own place (tests/workers/multinode_store_worker.py).

The store is built once by all ranks: each node's ranks write their chunks on their own disk, the statistics are
all-gathered, rank 0 receives the chunks it cannot see and assembles the store, and node 1's first rank writes rank
0's files into its own directory. A node that joins later (its copy gone) gets rank 0's copy without a forward.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import make_tiny_model
from test_reference import build, data_files, manifest_without_build

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
WORKER = os.path.join(TESTS_DIR, "workers", "multinode_store_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, nproc_per_node: int) -> list[dict]:
    base, logs = tmp_path / "nodes", tmp_path / "logs"
    base.mkdir()
    logs.mkdir()
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", str(nproc_per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             WORKER, "--base", str(base), "--log-dir", str(logs)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=420)[0])
    finally:
        for proc in procs:
            proc.kill()
    failed = [f"node {n}:\n{output[-4000:]}" for n, (proc, output) in enumerate(zip(procs, outputs)) if proc.returncode]
    assert not failed, "\n".join(failed)
    world = 2 * nproc_per_node
    return [json.loads((logs / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("nproc_per_node", [1, 2])
def test_two_nodes_without_a_shared_filesystem_build_once_and_each_hold_the_store(tmp_path, replay, nproc_per_node):
    ranks = _two_nodes(tmp_path, nproc_per_node)
    world = 2 * nproc_per_node
    single = build(make_tiny_model(), replay, tmp_path / "single", batch_size=3, chunk_size=5)
    node0, node1 = tmp_path / "nodes" / "node0" / "store", tmp_path / "nodes" / "node1" / "store"
    # Both node-local copies: byte-identical to each other (manifest included) and to a 1-process build.
    assert data_files(node0) == data_files(node1) == data_files(single.path)
    assert (node0 / "manifest.json").read_bytes() == (node1 / "manifest.json").read_bytes()
    assert manifest_without_build(node0) == manifest_without_build(single.path)
    assert not (node1 / ".building").exists() and not (node0 / ".building").exists()
    assert sorted(os.listdir(node0)) == sorted(os.listdir(single.path))  # no probe or partial file left behind

    # 24 samples in chunks of 5 (batches of 3): every rank ran the same number of forwards, the most any rank had.
    batches = [2, 2, 2, 2, 2]  # 5, 5, 5, 5, 4 samples
    most = max(sum(batches[c] for c in range(5) if c % world == r) for r in range(world))
    assert [r["phases"]["build"]["forwards"] for r in ranks] == [most] * world
    for r in ranks:
        assert r["world"] == world and r["phases"]["build"]["num_samples"] == len(replay)
        # A rejoining node gets rank 0's copy: no forward anywhere, the same files on every node.
        for name in ("rejoin", "open"):
            assert r["phases"][name]["forwards"] == 0, (name, r["rank"])
            got, want = r["phases"][name]["files"], ranks[0]["phases"]["build"]["files"]
            assert got == want, (name, r["rank"], {n for n in set(got) | set(want) if got.get(n) != want.get(n)})
            assert not r["phases"][name]["building_left"]
