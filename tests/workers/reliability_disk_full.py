"""Run by tests/test_reliability.py: build the reference store on a small tmpfs that another writer fills up.

Usage: reliability_disk_full.py MOUNT. For each moment ("chunks": after the 3rd forward; "assembly": after the
memory-mapped final files were created, before the first label is written into them), a filler file takes all free space; the build must fail
with a ReferenceStatesError and leave no manifest. The filler is then removed and the build resumed. Prints one
JSON line: per moment the error, whether a manifest / the work folder existed after it, and the resumed store's
data files (sha256) and manifest (without build timings), for the test to compare with an uninterrupted build.
"""

import hashlib
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from test_reliability import REPLAY_TEXTS, TOK, _model, data_files, manifest_without_build  # noqa: E402

from gere_hf.models import find_final_norm  # noqa: E402
from gere_hf.reference import BUILDING, MANIFEST, ReferenceStates, builder  # noqa: E402
from gere_hf.replay import ReplaySet  # noqa: E402


def fill(mount):
    with open(os.path.join(mount, "filler"), "wb", buffering=0) as f:  # unbuffered: close has nothing to flush
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def build_filling_up(mount, replay, out, when):
    """Build into ``out``; fill the disk at the chosen moment. Returns (the error, whether the disk was filled)."""
    model = _model()
    calls = []
    # "assembly": when the first chunk is labelled (after every forward), so the label files and the assembled
    # files meet the full disk.
    at = 3 if when == "chunks" else 1

    def trigger():
        calls.append(1)
        if len(calls) == at:
            fill(mount)

    real_labels = builder.threshold_labels
    if when == "chunks":
        handle = find_final_norm(model)[1].register_forward_hook(lambda *_: trigger())
    else:
        builder.threshold_labels = lambda *a: (trigger(), real_labels(*a))[1]
    try:
        ReferenceStates.build(model, replay, out, batch_size=4, chunk_size=4, progress=False)
        return None, len(calls) >= at
    except Exception as e:  # what a user would see
        return e, len(calls) >= at
    finally:
        builder.threshold_labels = real_labels
        if when == "chunks":
            handle.remove()


def main(mount):
    torch.set_num_threads(1)
    replay = ReplaySet.from_texts(REPLAY_TEXTS, TOK, max_length=48)
    report = {}
    for when in ("chunks", "assembly"):
        out = os.path.join(mount, when)
        error, filled = build_filling_up(mount, replay, out, when)
        case = {"error_type": type(error).__name__, "error": str(error), "filled": filled,
                "manifest_after_error": os.path.exists(os.path.join(out, MANIFEST)),
                "building_after_error": os.path.isdir(os.path.join(out, BUILDING))}
        os.remove(os.path.join(mount, "filler"))
        store = ReferenceStates.build(_model(), replay, out, batch_size=4, chunk_size=4, progress=False)
        case["data_files"] = {k: hashlib.sha256(v).hexdigest() for k, v in data_files(store.path).items()}
        case["manifest"] = manifest_without_build(store.path)
        report[when] = case
        del store
        shutil.rmtree(out)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
