"""The process group as gere_hf reads it: this process's rank and the world size, and a barrier; in one process (no
``torch.distributed`` group) rank 0 of 1, and the barrier returns at once. This module imports nothing of gere_hf."""

from __future__ import annotations

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
