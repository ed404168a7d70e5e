"""Model plumbing shared by the evaluation modules: where a model lives, how it runs a scoring forward, how texts are
tokenized for it."""

from __future__ import annotations

import functools
import inspect
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


@functools.lru_cache(maxsize=64)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_parameters(model) -> frozenset[str]:
    """The named arguments of the forward of the causal LM below PEFT/DDP wrappers (which pass them through)."""
    from ..models import unwrap_causal_lm

    return _forward_parameters(type(unwrap_causal_lm(model)))


def accepts_logits_to_keep(model) -> bool:
    """Whether the model computes logits only at the positions asked for (transformers causal LMs)."""
    return "logits_to_keep" in forward_parameters(model)


def cache_argument(model) -> str | None:
    """The forward argument that takes a KV cache (``cache`` from transformers 5.x, ``past_key_values`` before), or
    ``None`` for a model that cannot continue from one (plain modules, encoder-decoders)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    params = forward_parameters(model)
    if not {"position_ids", "use_cache", "logits_to_keep"} <= params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` for rows of logits ``[N, V]`` (any dtype): the upcast to float32 is of these rows only."""
    x = logits.float()
    return x.gather(-1, targets.to(x.device)[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


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


class HeadInputs:
    """What :func:`output_head_inputs` captured: the hidden states that feed the output head, and the head."""

    def __init__(self):
        self.hidden: torch.Tensor | None = None
        self.head: torch.nn.Module | None = None
        self.vocab_size: int | None = None


@contextmanager
def output_head_inputs(model):
    """For one forward inside the block: capture the hidden states ``[batch, length, hidden]`` that enter the model's
    output head (``get_output_embeddings()``) and let the head compute the last position only, so that the forward
    never holds ``[batch, length, vocab]`` logits; the caller then runs ``captured.head`` on a few positions at a
    time.

    The caller checks with :func:`head_matches_logits` that the model's logits (of the last position) are the head's
    output: a model that transforms its logits after the head (soft-capping, scaling) does not match, and needs a
    plain forward. Plain modules without an output head capture nothing (``captured.hidden`` stays ``None``).
    """
    from ..models import unwrap_causal_lm

    captured = HeadInputs()
    get_head = getattr(unwrap_causal_lm(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        yield captured
        return

    def keep_last(module, args):
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 and captured.hidden is None:
            captured.hidden = args[0]
            return (args[0][:, -1:],)
        return None

    handle = head.register_forward_pre_hook(keep_last)
    captured.head = head
    try:
        yield captured
    finally:
        handle.remove()


def head_matches_logits(captured: HeadInputs, logits: torch.Tensor) -> bool:
    """Whether the model's logits of the last position are its head's output (nothing applied after the head)."""
    if captured.hidden is None or logits.dim() != 3 or logits.shape[1] != 1:
        return False
    expected = captured.head(captured.hidden[:, -1:])
    if expected.shape != logits.shape:
        return False
    captured.vocab_size = int(expected.shape[-1])
    return bool(torch.allclose(expected.float(), logits.float(), rtol=1e-5, atol=1e-5))
