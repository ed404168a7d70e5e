"""The store's on-disk format: its file names and versions, and the 2-bit labels, 4 to a byte.

A label is −1, 0 or +1 (at or below the lower threshold, between, at or above the upper one); its 2-bit code is the
label's two lowest bits (−1 → 3, 0 → 0, +1 → 1), the first element in the lowest bits of its byte. A sample's labels
start on a byte boundary (``label_offsets`` in ``index.safetensors``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # version 1: int32 token ids and no recorded precision
MANIFEST = "manifest.json"
BUILDING = ".building"
PROBE_PREFIX = ".gere-probe-"  # what the ranks of a build write into a store folder to find who shares it
STORE_FILES = ("stats.safetensors", "index.safetensors", "tokens.bin", "labels.bin")
EXTRA_FILES = {"hidden": ("hidden.bin",), "topk": ("topk_logprobs.bin", "topk_ids.bin")}
KNOWN_EXTRAS = tuple(EXTRA_FILES)
_LABEL_LUT = torch.tensor([0, 1, 0, -1], dtype=torch.int8)  # 2-bit code -> label; code 2 never occurs
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def is_store(path: str) -> bool:
    """Whether ``path`` holds a complete store (its manifest is written last)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def pack_labels(labels: torch.Tensor) -> np.ndarray:
    """Pack int8 labels in {−1, 0, 1} into bytes, 4 per byte (first element in the lowest bits)."""
    return pack_codes(labels).cpu().numpy()


def pack_codes(labels: torch.Tensor) -> torch.Tensor:
    """:func:`pack_labels` on the labels' own device, as a uint8 tensor."""
    codes = (labels.reshape(-1).to(torch.int16) & 3).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_labels(packed: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_labels`, on whatever device ``packed`` lives: one fused shift-and-lookup."""
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 3
    labels = _LABEL_LUT.to(packed.device)[codes.long()].flatten(-2)
    return labels if numel is None else labels[..., :numel]


def packed_size(num_tokens: int, hidden_size: int) -> int:
    return (num_tokens * hidden_size + 3) // 4


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every id of a vocabulary of ``vocab_size`` entries."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)
