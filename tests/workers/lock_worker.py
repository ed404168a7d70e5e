"""A second (or third) real process for tests/test_locks.py: it holds a folder's lock, or builds a reference store.

Usage:
  lock_worker.py hold FOLDER READY_FILE RELEASE_FILE   take FOLDER's lock (without waiting), touch READY_FILE, hold it
                                                       until RELEASE_FILE exists (or forever: the test kills it)
  lock_worker.py build STORE RESULT_JSON [WAIT_FOR]    build (or open) a tiny reference store at STORE, touching
                                                       RESULT_JSON.started just before; with WAIT_FOR, the first forward
                                                       waits until that file exists (and 2 s more). Writes the number of
                                                       forwards this process ran and the store's manifest to
                                                       RESULT_JSON
"""

import json
import os
import sys
import time

import torch


def hold(folder, ready, release):
    from gere_hf.locks import folder_lock

    with folder_lock(folder, "lock_worker hold", wait=False):
        open(ready, "w").close()
        while not os.path.exists(release):
            time.sleep(0.05)
    return 0


def build(store, result, wait_for=None):
    from transformers import ByT5Tokenizer

    from gere_hf import ReferenceStates, ReplaySet
    from gere_hf.models import find_final_norm, tiny_llama

    model = tiny_llama(hidden_size=32, seed=0, attn_implementation="eager")
    forwards = []

    def count(*_):
        if wait_for and not forwards:  # another process is about to build the same store: build while it tries
            while not os.path.exists(wait_for):
                time.sleep(0.02)
            time.sleep(2.0)
        forwards.append(1)

    find_final_norm(model)[1].register_forward_hook(count)
    texts = [f"Replay text {i}: general knowledge about rivers and stars." for i in range(16)]
    replay = ReplaySet.from_texts(texts, ByT5Tokenizer(), max_length=48)
    open(f"{result}.started", "w").close()
    opened = ReferenceStates.build(model, replay, store, batch_size=4, chunk_size=4, progress=False)
    with open(result, "w", encoding="utf-8") as f:
        json.dump({"forwards": len(forwards), "manifest": opened.manifest, "ended": time.time()}, f)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "hold":
        sys.exit(hold(*args))
    sys.exit(build(*args))
