"""Model plumbing shared by the evaluation modules: where a model lives, how it runs a scoring forward, how texts are
tokenized for it."""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager

import torch

from ..models import is_peft_model, needs_task_ids, unwrap_causal_lm, virtual_token_count


def argmax(values) -> int:
    """The index of the largest value; ties go to the earlier one (the earlier choice, the earlier option)."""
    return max(range(len(values)), key=values.__getitem__)


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
            # PEFT's prefix-tuning forward sets past_key_values to a fresh prefix: a cache passed under that name
            # would be replaced, so such a model cannot continue from a prompt's cache (transformers 5 names it cache).
            return None if name == "past_key_values" and keeps_prompt_in_cache(model) else name
    return None


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def virtual_prompt_model(model):
    """The PEFT model whose forward prepends virtual-token embeddings to every input (prompt tuning, P-tuning, CPT),
    below any DDP/DeepSpeed wrapper; ``None`` for every other model (prefix tuning keeps its prompt in the KV cache
    and prepends no position).

    Multitask prompt tuning is refused: its prompt depends on a task id per input, which evaluation inputs lack.
    """
    if virtual_token_count(model) == 0:
        return None
    if needs_task_ids(model):
        raise ValueError(
            f"{type(model).__name__} is a multitask prompt-tuning model: its virtual tokens depend on a task id per "
            "input, which evaluation inputs do not carry. Evaluate one task's prompt as a prompt-tuning model "
            "(PEFT's MultitaskPromptTuningConfig initialises one from a task's prompt), or score it with PEFT's "
            "forward and task_ids yourself."
        )
    return model if callable(getattr(model, "get_prompt", None)) else model.module


def keeps_prompt_in_cache(model) -> bool:
    """A prefix-tuning PEFT model: its prompt is key/value states that its forward puts in front of the cache."""
    if not is_peft_model(model):
        return False
    config = (model if hasattr(model, "active_peft_config") else model.module).active_peft_config
    return config.is_prompt_learning and config.peft_type.value in ("PREFIX_TUNING", "CARTRIDGE")


def virtual_prompt_inputs(prompted, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          position_ids: torch.Tensor | None = None) -> dict:
    """The base model's inputs for ``input_ids`` with ``prompted``'s virtual tokens in front of every row, as PEFT's
    forward builds them (its word embeddings, ``get_prompt``), plus what PEFT's forward cannot take: ``position_ids``
    (shifted past the virtual tokens, which take positions ``0 .. k-1``), so that a left-padded row, whose padding
    then lies between the virtual tokens and the text, is scored as PEFT scores the row alone."""
    batch = input_ids.shape[0]
    embed = getattr(prompted, "word_embeddings", None)
    if embed is None:
        embed = prompted.get_base_model().get_input_embeddings()
    embeds = embed(input_ids)
    prompts = prompted.get_prompt(batch_size=batch).to(device=embeds.device, dtype=embeds.dtype)
    k = prompts.shape[1]
    inputs = {
        "inputs_embeds": torch.cat([prompts, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1),
    }
    if position_ids is not None:
        inputs["position_ids"] = torch.cat(
            [torch.arange(k, device=position_ids.device).expand(batch, k), position_ids + k], dim=1)
    return inputs


def scoring_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """``model(input_ids=..., attention_mask=..., **kwargs)`` whose logits are the text's: what every scoring path
    runs.

    A prompt-learning PEFT model (:func:`virtual_prompt_model`) prepends ``k`` virtual tokens to every input, so its
    logits hold ``k`` more positions than the text, ``logits_to_keep`` indices miss by ``k``, its forward drops
    ``position_ids`` (a left-padded row gets its text at positions shifted by the padding), and a forward that
    continues from a KV cache would prepend the virtual tokens a second time. For such a model the base model runs on
    :func:`virtual_prompt_inputs` (a forward that continues from a cache, which holds the virtual tokens already,
    gets the text alone, its mask and positions extended by ``k``), ``logits_to_keep`` indices are shifted by ``k``,
    and the virtual tokens' logits are dropped: each row's logits are those of PEFT's own forward of the row alone.
    """
    prompted = virtual_prompt_model(model)
    if prompted is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    k = virtual_token_count(prompted)
    position_ids = kwargs.pop("position_ids", None)
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor):
        kwargs["logits_to_keep"] = keep + k
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    base = prompted.get_base_model()
    if cache is not None and cache.get_seq_length() > 0:
        batch = input_ids.shape[0]
        mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
        out = base(input_ids=input_ids, attention_mask=mask,
                   **({"position_ids": position_ids + k} if position_ids is not None else {}), **kwargs)
    else:
        out = base(**virtual_prompt_inputs(prompted, input_ids, attention_mask, position_ids), **kwargs)
    logits = getattr(out, "logits", None)
    if logits is not None and logits.dim() == 3 and logits.shape[1] == k + input_ids.shape[1]:
        out.logits = logits[:, k:]  # the virtual tokens' positions predict no text token
    return out


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
