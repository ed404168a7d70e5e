"""Shared by the evaluation tests: models whose outputs are known (a bigram table over ByT5's byte ids) and tasks."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import torch

from gere_hf.evaluation import Task

VOCAB = 384  # ByT5: id = byte + 3; 0 pad, 1 eos, 2 unk


def byte_id(ch: str) -> int:
    return ch.encode()[0] + 3


class BigramLM(torch.nn.Module):
    """A model whose output we control: the logits at a position are ``table[token at that position]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def unigram_model(preferred: str) -> BigramLM:
    """Whatever the context, strongly prefers the characters of ``preferred`` and eos."""
    table = torch.zeros(VOCAB, VOCAB)
    for ch in set(preferred):
        table[:, byte_id(ch)] = 10.0
    table[:, 1] = 10.0
    return BigramLM(table)


def chain_model(chain: str, after: str = ":") -> BigramLM:
    """After ``after`` greedily writes ``chain`` (each character predicts the next)."""
    table = torch.zeros(VOCAB, VOCAB)
    prev = after
    for ch in chain:
        table[byte_id(prev), byte_id(ch)] = 10.0
        prev = ch
    return BigramLM(table)


def stop_model() -> BigramLM:
    """After ':' and a space, prefers ' yes' to ' no', but never stops after 'yes' (eos is unlikely after 's') and
    stops at once after 'no'. Per token, ' no' (3 bytes) beats ' yes' (4 bytes) only through its shorter length."""
    table = torch.zeros(VOCAB, VOCAB)
    table[byte_id(":"), byte_id(" ")] = 10.0
    table[byte_id(" "), byte_id("y")] = 6.0
    table[byte_id(" "), byte_id("n")] = 5.0
    table[byte_id("y"), byte_id("e")] = 10.0
    table[byte_id("e"), byte_id("s")] = 10.0
    table[byte_id("s"), byte_id("!")] = 10.0  # after "yes" it goes on: "yes!"
    table[byte_id("n"), byte_id("o")] = 10.0
    table[byte_id("o"), 1] = 10.0  # after "no": eos
    return BigramLM(table)


def make_task(name, prompts, completions, choices, **options):
    ds = datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})
    return Task(name, ds, ds, choices=choices, **options)


YES_NO_PROMPTS = [f"Question {i}: is it so?\nAnswer:" for i in range(7)]
