"""Shared helpers of the demo experiments (see docs/lab/experiments.md): general-text measurements and result files.

Two kinds of held-out general text are measured:

* ``wiki``: built-in Wikipedia summaries never used for replay (:func:`gere_hf.replay.replay_heldout_texts`): the
  same domain as the replay texts, what the demo and the recipes report;
* ``news``: the Lee news corpus shipped in gensim's test data (300 Australian news articles, 2001): general English
  *outside* the replay domain. Replay CE trains on the replay domain; retention elsewhere is the harder test.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


def general_texts(kind: str, n: int) -> list[str]:
    from gere_hf.replay import news_texts, replay_heldout_texts

    if kind == "wiki":
        return replay_heldout_texts(n)
    if kind == "news":
        return news_texts(n)
    raise ValueError(f"Unknown general text {kind!r}; use wiki or news.")


def measure_general(model, tokenizer, kinds=("wiki", "news"), n: int = 40, max_length: int = 128) -> dict:
    from gere_hf.evaluation import general_perplexity

    return {kind: general_perplexity(model, tokenizer, general_texts(kind, n), max_length=max_length,
                                     progress=False)["nll"] for kind in kinds}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE, check=False).stdout.strip()
    except OSError:
        commit = None
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg": load,
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def append_result(name: str, record: dict) -> str:
    """Append ``record`` to ``results/<name>.json`` (a JSON list), so every run of a script is kept."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    records.append(record)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path
