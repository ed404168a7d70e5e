"""Model plumbing shared by the evaluation modules: where a model lives, how it runs a scoring forward, how texts are
tokenized for it."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_kwargs(model) -> dict:
    # No KV cache for single forward passes (transformers models build one in eval mode by default).
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


@contextmanager
def eval_mode(model):
    """No-grad eval mode for the block; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else eos, else 0 (padded positions are masked)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_text(tokenizer, text: str, **kwargs) -> list[int]:
    with warnings.catch_warnings():  # ByT5 warns on every text that already ends with </s>, as TRL's do
        warnings.simplefilter("ignore", UserWarning)
        return list(tokenizer(text=text, **kwargs)["input_ids"])
