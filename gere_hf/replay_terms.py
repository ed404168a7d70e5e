"""The replay terms GeRe can add to the replay CE, in a registry: what each one needs and the function that computes it.

A :class:`ReplayTerm` declares what it reads from the replay forward (the final norm's output, captured by a hook, or
the logits), what the reference store must hold for it besides the tokens (the 2-bit threshold labels, fp16 hidden
states, teacher top-k log-probs) and a function that returns one value per replay sample. ``GeReConfig`` accepts a
registered name as its ``loss``; the store build, the collator and the trainer read what to record, ship and compute
from the entry. ``ce`` (replay CE alone) and ``none`` (no replay) are not terms.

Adding a term is one entry and one function (docs/losses.md shows an example)::

    def cosine_term(inputs: ReplayTermInputs) -> torch.Tensor:
        ...  # a [B] tensor, one value per replay sample

    register_replay_term(ReplayTerm("cos", reads="hidden", store_extras=("hidden",), compute=cosine_term))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .losses import feature_imitation_loss, logit_imitation_loss, threshold_margin_loss
from .reference import KNOWN_EXTRAS, unpack_labels

# Replay losses that are not terms: the replay CE alone, and no replay at all.
CE_ONLY, NO_REPLAY = "ce", "none"
STORE_EXTRAS = KNOWN_EXTRAS  # what a store can hold besides tokens and labels
READS = ("hidden", "logits")


@dataclass
class ReplayTermInputs:
    """What a term's function gets for one replay micro-batch (virtual tokens of prompt-learning PEFT models dropped).

    Attributes:
        hidden: ``[B, T, H]`` the final norm's output, when the term reads ``"hidden"``.
        logits: ``[B, T, V]`` the replay forward's logits, when it reads ``"logits"``.
        batch: the collator's replay tensors, prefix stripped: ``attention_mask`` ``[B, T]``, and by the store's
            contents ``packed_labels`` / ``tm_labels``, ``ref_hidden``, ``topk_logprobs`` and ``topk_ids``.
        lower, upper: ``[H]`` the store's thresholds, on the training device.
        config: the run's ``GeReConfig`` (for a term's own options, e.g. ``kl_temperature``).
    """

    hidden: torch.Tensor | None
    logits: torch.Tensor | None
    batch: dict
    lower: torch.Tensor
    upper: torch.Tensor
    config: Any

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["attention_mask"]

    def threshold_labels(self) -> torch.Tensor:
        """The store's int8 labels ``[B, T, H]``, unpacked on the device when they travelled packed."""
        if "packed_labels" in self.batch:
            packed = self.batch["packed_labels"]
            return unpack_labels(packed).view(*packed.shape[:2], -1)
        return self.batch["tm_labels"]


@dataclass(frozen=True)
class ReplayTerm:
    """One replay term.

    Attributes:
        name: the ``GeReConfig.loss`` value that selects it.
        reads: ``"hidden"`` (the final norm's output: a hook records it during the replay forward) or ``"logits"``.
        compute: ``compute(inputs) -> [B]`` tensor, one value per replay sample (the official code's value for a
            micro-batch of that sample alone), differentiable w.r.t. the student's hidden states or logits.
        store_extras: what the store must hold for it besides the tokens: ``"hidden"`` (fp16 states), ``"topk"``.
        needs_labels: whether it reads the store's 2-bit threshold labels (the collator then ships them).
        description: one line for docs and errors.
    """

    name: str
    reads: str
    compute: Callable[[ReplayTermInputs], torch.Tensor]
    store_extras: tuple[str, ...] = field(default=())
    needs_labels: bool = False
    description: str = ""

    def __post_init__(self):
        if not self.name or self.name in (CE_ONLY, NO_REPLAY):
            raise ValueError(f"A replay term cannot be named {self.name!r} ('ce' and 'none' are not terms).")
        if self.reads not in READS:
            raise ValueError(f"ReplayTerm {self.name!r}: reads must be one of {READS}, got {self.reads!r}.")
        unknown = [e for e in self.store_extras if e not in STORE_EXTRAS]
        if unknown:
            raise ValueError(f"ReplayTerm {self.name!r}: unknown store extras {unknown}; a store holds {STORE_EXTRAS}.")


REPLAY_TERMS: dict[str, ReplayTerm] = {}


def register_replay_term(term: ReplayTerm, overwrite: bool = False) -> ReplayTerm:
    """Add a term to the registry; ``GeReConfig(loss=term.name)`` then selects it."""
    if term.name in REPLAY_TERMS and not overwrite:
        raise ValueError(f"A replay term named {term.name!r} is registered already; pass overwrite=True to replace it.")
    REPLAY_TERMS[term.name] = term
    return term


def get_replay_term(loss: str) -> ReplayTerm | None:
    """The term of a replay loss; None for 'ce' and 'none', which add none."""
    return REPLAY_TERMS.get(loss)


def replay_loss_names() -> tuple[str, ...]:
    """Every value ``GeReConfig.loss`` accepts, as docs and errors list them: the paper's method (the first term
    registered, 'tm'), vanilla replay ('ce'), the other terms in registration order, then no replay ('none')."""
    names = list(REPLAY_TERMS)
    return (*names[:1], CE_ONLY, *names[1:], NO_REPLAY)


# -- the paper's terms --------------------------------------------------------------------------------------------------


def _threshold_margin(inputs: ReplayTermInputs) -> torch.Tensor:
    return threshold_margin_loss(inputs.hidden, inputs.threshold_labels(), inputs.lower, inputs.upper, inputs.mask,
                                 per_sample=True)


def _logit_imitation(inputs: ReplayTermInputs) -> torch.Tensor:
    return logit_imitation_loss(inputs.logits, inputs.batch["topk_logprobs"], inputs.batch["topk_ids"], inputs.mask,
                                inputs.config.kl_temperature, per_sample=True)


def _feature_imitation(p: int) -> Callable[[ReplayTermInputs], torch.Tensor]:
    def compute(inputs: ReplayTermInputs) -> torch.Tensor:
        return feature_imitation_loss(inputs.hidden, inputs.batch["ref_hidden"], inputs.mask, p=p, per_sample=True)

    return compute


register_replay_term(ReplayTerm("tm", reads="hidden", compute=_threshold_margin, needs_labels=True,
                                description="threshold margin on the final hidden states (GeRe)"))
register_replay_term(ReplayTerm("kl", reads="logits", compute=_logit_imitation, store_extras=("topk",),
                                description="top-k KL to the base model's next-token distribution"))
register_replay_term(ReplayTerm("l1", reads="hidden", compute=_feature_imitation(1), store_extras=("hidden",),
                                description="L1 distance to the base model's final hidden states"))
register_replay_term(ReplayTerm("l2", reads="hidden", compute=_feature_imitation(2), store_extras=("hidden",),
                                description="squared L2 distance to the base model's final hidden states"))

__all__ = [
    "REPLAY_TERMS",
    "ReplayTerm",
    "ReplayTermInputs",
    "get_replay_term",
    "register_replay_term",
    "replay_loss_names",
]
