"""Which sample each position of a task batch belongs to, for every batch layout transformers and TRL produce.

GeRe weighs every sample once in a step (the paper's runs: per-device batch 1 with gradient accumulation), so it
needs the samples of a task batch, not its rows:

* padded rows (``attention_mask``; with or without ``position_ids``): one sample per row, its unmasked positions;
* padding-free rows (TRL ``padding_free=True``, and packing with ``bfd``: ``position_ids`` and no
  ``attention_mask``): a sample starts wherever ``position_ids`` restarts at 0. With ``pad_to_multiple_of`` TRL pads
  the row with ``position_ids`` 0, which would read as one-token samples: the padding is the run of zeros after the
  row's last position > 0, and belongs to no sample;
* packed blocks without sequence boundaries (TRL's ``wrapped`` packing, pre-chunked blocks): ``position_ids``
  never restart, so each row is one sample. Such a block holds pieces of several documents; nothing in the batch
  says where they end.

A one-token sequence has no next-token target; in a padding-free row it cannot be told from padding and is not
counted.
"""

from __future__ import annotations

import torch

__all__ = ["count_samples", "count_targets", "per_sample_sums", "sample_ids"]


def sample_ids(batch: dict) -> tuple[torch.Tensor, int]:
    """``(ids, n)``: ``ids[b, t]`` is the index (0 … n−1) of the sample position ``(b, t)`` belongs to, −1 for
    padding; samples are numbered row by row, left to right."""
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape[:2]
    position_ids = batch.get("position_ids")
    padding_free = position_ids is not None and "attention_mask" not in batch
    if not padding_free:
        mask = batch.get("attention_mask")
        real = torch.ones(rows, width, dtype=torch.bool, device=input_ids.device) if mask is None else mask.bool()
        ids = torch.arange(rows, device=input_ids.device).unsqueeze(1).expand(rows, width)
        return torch.where(real, ids, -1), rows
    positions = position_ids.reshape(rows, width)
    column = torch.arange(width, device=positions.device).expand(rows, width)
    # The last position of a sequence of two tokens or more has position_ids > 0; everything after the row's last
    # such position is padding (TRL pads position_ids with 0).
    last_real = torch.where(positions > 0, column, -1).max(dim=1, keepdim=True).values
    real = column <= last_real
    starts = (positions == 0) & real
    per_row = starts.sum(dim=1)
    offsets = torch.cumsum(per_row, 0) - per_row
    ids = torch.cumsum(starts.long(), dim=1) - 1 + offsets.unsqueeze(1)
    return torch.where(real, ids, -1), int(per_row.sum())


def count_samples(batch: dict | list) -> int:
    """Samples in a task batch (see the module docstring); a list of examples (what TRL's on-policy trainers, SDFT
    among them, collate: each example one rollout) counts its examples; 0 for a batch without ``input_ids``."""
    if isinstance(batch, list):
        return len(batch)
    if not hasattr(batch.get("input_ids"), "shape"):
        return 0
    return sample_ids(batch)[1]


def per_sample_sums(values: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: the sum of ``values`` over each sample's positions (``ids`` as :func:`sample_ids` gives them, −1 left
    out); differentiable in ``values``."""
    flat_ids = ids.reshape(-1)
    keep = flat_ids >= 0
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add(0, flat_ids[keep], values.reshape(-1)[keep])


def count_targets(batch: dict) -> int:
    """Next-token targets of a task batch: labels other than −100 after the first position of each row."""
    labels = None if isinstance(batch, list) else batch.get("labels")
    if not hasattr(labels, "shape"):
        return 0
    return int((labels[..., 1:] != -100).sum())
