"""Replay tensors from the memory-mapped store, merged into the user's task batch under reserved keys.

The user's (or TRL's) collator builds the task batch unchanged; the trainer adds to it what :class:`GeReCollator`
builds for the replay samples that the :class:`~gere_hf.schedule.ReplaySchedule` assigns to the micro-batch. Everything under the ``gere_`` prefix is removed
by the trainer before the model sees the batch. Labels travel packed (2 bits per element) and are unpacked on the
training device in one fused op (:func:`gere_hf.reference.unpack_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .reference import ReferenceStore

RESERVED_PREFIX = "gere_"


def split_replay_inputs(inputs: dict) -> tuple[dict, dict]:
    """(task inputs, replay inputs): the reserved keys, with their prefix stripped, go to the second dict."""
    task = {k: v for k, v in inputs.items() if not k.startswith(RESERVED_PREFIX)}
    replay = {k[len(RESERVED_PREFIX) :]: v for k, v in inputs.items() if k.startswith(RESERVED_PREFIX)}
    return task, replay


class GeReCollator:
    """Collates replay samples of a :class:`~gere_hf.reference.ReferenceStore` into tensors under reserved keys,
    which the trainer merges into its task batches (:meth:`replay_batch`, :meth:`empty_replay_batch`).

    Args:
        store: the reference store (its token ids, labels and extras are read per sample, memory-mapped).
        pad_token_id: padding id of the replay input ids (padding is masked and never enters a loss).
        extras: store extras the loss needs (``"hidden"``, ``"topk"``).
        need_labels: whether the loss reads the store's 2-bit labels (they are shipped packed when it does).
    """

    def __init__(
        self,
        store: ReferenceStore,
        pad_token_id: int,
        extras: Sequence[str] = (),
        need_labels: bool = True,
    ):
        self.store = store
        self.pad_token_id = int(pad_token_id)
        self.extras = tuple(extras)
        self.need_labels = need_labels
        store.require_extras(self.extras)

    def empty_replay_batch(self) -> dict[str, torch.Tensor]:
        """A replay forward of two padding tokens and no targets, under reserved keys: for a process that has no
        replay sample in a micro-batch where others do (their forward is collective, see ``ReplaySchedule``)."""
        return {
            "gere_input_ids": torch.full((1, 2), self.pad_token_id, dtype=torch.long),
            "gere_attention_mask": torch.ones((1, 2), dtype=torch.long),
            "gere_empty": torch.ones(1, dtype=torch.bool),
        }

    def replay_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded replay tensors for ``indices``, under reserved keys; empty for no indices."""
        if len(indices) == 0:
            return {}
        store = self.store
        h = store.hidden_size
        lengths = [int(store.lengths[i]) for i in indices]
        width = max(lengths)
        b = len(indices)
        input_ids = np.full((b, width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((b, width), dtype=np.int64)
        for row, i in enumerate(indices):
            input_ids[row, : lengths[row]] = store.input_ids(i)
            attention_mask[row, : lengths[row]] = 1
        labels = np.where(attention_mask == 1, input_ids, -100)
        out = {
            "gere_input_ids": torch.from_numpy(input_ids),
            "gere_attention_mask": torch.from_numpy(attention_mask),
            "gere_labels": torch.from_numpy(labels),
            "gere_indices": torch.tensor(list(indices), dtype=torch.long),
        }
        if self.need_labels:
            if h % 4 == 0:  # every token row is a whole number of bytes: ship packed, unpack on the device
                packed = np.zeros((b, width, h // 4), dtype=np.uint8)
                for row, i in enumerate(indices):
                    packed[row, : lengths[row]] = store.packed_labels(i).reshape(lengths[row], h // 4)
                out["gere_packed_labels"] = torch.from_numpy(packed)
            else:
                labels_tm = torch.zeros((b, width, h), dtype=torch.int8)
                for row, i in enumerate(indices):
                    labels_tm[row, : lengths[row]] = store.labels(i)
                out["gere_tm_labels"] = labels_tm
        if "hidden" in self.extras:
            hidden = torch.zeros((b, width, h), dtype=torch.float16)
            for row, i in enumerate(indices):
                hidden[row, : lengths[row]] = store.hidden(i)
            out["gere_ref_hidden"] = hidden
        if "topk" in self.extras:
            lp = torch.zeros((b, width, store.topk), dtype=torch.float32)
            ids = torch.zeros((b, width, store.topk), dtype=torch.long)
            for row, i in enumerate(indices):
                lp[row, : lengths[row]], ids[row, : lengths[row]] = store.topk_teacher(i)
            out["gere_topk_logprobs"] = lp
            out["gere_topk_ids"] = ids
        return out
