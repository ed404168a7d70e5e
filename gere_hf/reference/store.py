"""The reader: a built store, memory-mapped, opened (and checked) on one process or on every rank of a launch."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.numpy import load_file as load_np

from ..distributed import dist_info
from ..fileio import file_blake2b
from ..replay import ReplaySet
from .builder import build_store
from .errors import ReferenceStoreError, ReferenceStoreMismatch
from .exchange import broadcast_json, fail_together, sync_store
from .fingerprint import FINGERPRINT_FIELDS, compare_fingerprints
from .format import BUILDING, MANIFEST, READABLE_FORMAT_VERSIONS, is_store, unpack_labels

logger = logging.getLogger(__name__)


class ReferenceStore:
    """A built, memory-mapped reference store. Create with :meth:`build` or :meth:`open`."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        stats = load_np(os.path.join(path, "stats.safetensors"))
        index = load_np(os.path.join(path, "index.safetensors"))
        self.count = int(stats["count"][0])
        self.mean = torch.from_numpy(stats["mean"])
        self.std = torch.from_numpy(stats["std"])
        self.lower = torch.from_numpy(stats["lower"])
        self.upper = torch.from_numpy(stats["upper"])
        self.lengths = index["lengths"]
        self.token_offsets = index["token_offsets"]
        self.label_offsets = index["label_offsets"]
        self.hidden_size = int(manifest["hidden_size"])
        self.topk = int(manifest.get("topk") or 0)
        self.extras = tuple(manifest.get("extras", ()))
        self.token_dtype = np.dtype(manifest.get("token_dtype", "int32"))  # format 1 stored int32
        self._tokens = self._map("tokens.bin", self.token_dtype)
        self._labels = self._map("labels.bin", np.uint8)
        self._hidden = self._map("hidden.bin", np.float16) if "hidden" in self.extras else None
        self._topk_lp = self._map("topk_logprobs.bin", np.float32) if "topk" in self.extras else None
        self._topk_ids = self._map("topk_ids.bin", np.int32) if "topk" in self.extras else None

    def _map(self, name: str, dtype) -> np.ndarray:
        path = os.path.join(self.path, name)
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    # -- reading ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def fingerprint(self) -> dict:
        return dict(self.manifest["fingerprint"])

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    @property
    def k(self) -> float:
        return float(self.manifest["fingerprint"]["k"])

    def input_ids(self, i: int) -> np.ndarray:
        return np.asarray(self._tokens[self.token_offsets[i] : self.token_offsets[i + 1]]).astype(np.int64)

    def packed_labels(self, i: int) -> np.ndarray:
        return np.asarray(self._labels[self.label_offsets[i] : self.label_offsets[i + 1]])

    def labels(self, i: int) -> torch.Tensor:
        """Labels of sample i as int8 [T, H]."""
        n = int(self.lengths[i]) * self.hidden_size
        return unpack_labels(torch.from_numpy(self.packed_labels(i).copy()), n).view(-1, self.hidden_size)

    def hidden(self, i: int) -> torch.Tensor:
        self._require("hidden")
        a, b = self.token_offsets[i] * self.hidden_size, self.token_offsets[i + 1] * self.hidden_size
        return torch.from_numpy(np.array(self._hidden[a:b])).view(-1, self.hidden_size)

    def topk_teacher(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._require("topk")
        a, b = self.token_offsets[i] * self.topk, self.token_offsets[i + 1] * self.topk
        lp = torch.from_numpy(np.array(self._topk_lp[a:b])).view(-1, self.topk)
        ids = torch.from_numpy(np.array(self._topk_ids[a:b]).astype(np.int64)).view(-1, self.topk)
        return lp, ids

    def _require(self, extra: str) -> None:
        if extra not in self.extras:
            raise ReferenceStoreError(
                f"The store at {self.path} has no {extra!r} extra (it has {list(self.extras) or 'none'}); the chosen "
                f"loss needs it. Rebuild with extras including {extra!r} (`--extras {extra}`)."
            )

    def require_extras(
        self, extras: Sequence[str], topk: int | None = None, topk_temperature: float | None = None
    ) -> None:
        """Refuse a store that lacks an extra, or whose teacher top-k was recorded with another K or temperature.

        A top-k store keeps ``log_softmax(z / T)`` at its own ``T`` and ``K``: read at another temperature it would be
        a silently different teacher (a T=1 teacher used as if it were T=4).
        """
        for extra in extras:
            self._require(extra)
        if "topk" not in extras:
            return
        stored_t = self.manifest.get("topk_temperature")
        differences = {}
        if topk is not None and int(topk) != self.topk:
            differences["topk"] = (self.topk, int(topk))
        if topk_temperature is not None and (stored_t is None or abs(float(stored_t) - float(topk_temperature)) > 1e-12):
            differences["topk_temperature"] = (stored_t, float(topk_temperature))
        if differences:
            raise ReferenceStoreMismatch(self.path, differences)

    def summary(self) -> dict:
        std = self.std.numpy()
        return {
            "path": self.path,
            "samples": len(self),
            "tokens": self.num_tokens,
            "hidden_size": self.hidden_size,
            "k": self.k,
            "precision": self.fingerprint.get("precision"),
            "extras": list(self.extras),
            "bytes_on_disk": self.manifest["bytes_on_disk"],
            "bits_per_element": self.manifest["bits_per_element"],
            "mean_of_means": float(self.mean.mean()),
            "std_range": [float(std.min()), float(std.max())],
            "label_fractions": self.manifest.get("label_fractions"),
        }

    # -- opening ------------------------------------------------------------------------------------------------------

    @staticmethod
    def is_store(path: str) -> bool:
        return is_store(path)

    @classmethod
    def open(
        cls,
        path: str,
        fingerprint: dict | None = None,
        fields: Sequence[str] = FINGERPRINT_FIELDS,
        verify: bool = True,
    ) -> ReferenceStore:
        """Open a complete store; check it against ``fingerprint`` (only ``fields``) and, with ``verify``, checksums."""
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            if os.path.isdir(os.path.join(path, BUILDING)):
                raise ReferenceStoreError(
                    f"The reference store at {path} is incomplete: its build was interrupted. Run the build again "
                    "with the same settings to resume it."
                )
            raise ReferenceStoreError(f"{path} is not a reference store (no {MANIFEST}). Build one with `gere-hf cache`.")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ReferenceStoreError(f"The manifest of {path} is corrupted ({e}). Rebuild the store.") from e
        if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ReferenceStoreError(
                f"The store at {path} has format version {manifest.get('format_version')}, this gere_hf reads "
                f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Rebuild it with this version."
            )
        for name, info in manifest["files"].items():
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise ReferenceStoreError(f"The store at {path} lacks {name}. Rebuild the store.")
            size = os.path.getsize(file_path)
            if size != info["bytes"]:
                raise ReferenceStoreError(
                    f"{file_path} is truncated or altered: {size} bytes, the manifest records {info['bytes']}. "
                    "Rebuild the store."
                )
            if verify and file_blake2b(file_path) != info["blake2b"]:
                raise ReferenceStoreError(
                    f"{file_path} is corrupted: its checksum does not match the manifest. Rebuild the store."
                )
        if fingerprint is not None:
            stored = manifest["fingerprint"]
            unrecorded = [f for f in fields if f in fingerprint and f not in stored]
            if unrecorded:  # a format-1 store: it predates the precision field
                logger.warning("The reference store at %s (format %s) does not record %s; it cannot be checked. "
                               "Rebuild it to have it checked.", path, manifest.get("format_version"),
                               ", ".join(unrecorded))
            diff = compare_fingerprints(stored, fingerprint, [f for f in fields if f not in unrecorded])
            if diff:
                raise ReferenceStoreMismatch(path, diff)
        return cls(path, manifest)

    # -- building -----------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model,
        replay: ReplaySet,
        out_dir: str,
        *,
        k: float = 1.0,
        batch_size: int = 16,
        chunk_size: int = 64,
        dtype: torch.dtype | str | None = None,
        extras: Sequence[str] = (),
        topk: int = 32,
        topk_temperature: float = 1.0,
        reference: str = "base",
        rebuild: bool = False,
        forward_model=None,
        keep_states_bytes: int | None = None,
        open_fields: Sequence[str] = FINGERPRINT_FIELDS,
        progress: bool = True,
    ) -> ReferenceStore:
        """Record the reference states of ``model`` on ``replay`` into ``out_dir`` (or open it if already built).

        The states never leave the device: the forward's final-norm output is reduced there into float64 statistics
        and, once the thresholds over all tokens are known, labelled and packed there; only the packed labels (and
        the extras asked for) are copied to the host. States wait on the device between the two steps while they fit
        in ``keep_states_bytes`` (None: a quarter of the free device memory, or of the available host memory when
        the model runs on the CPU; 0: never), and chunks that do not fit are forwarded a second time for their labels.

        Under ``torch.distributed`` every rank calls this; each forwards a disjoint set of chunks (every rank the same
        number of forwards), the statistics are summed in chunk order (so the result is byte-identical to a
        1-process build), rank 0 writes the store, and every node whose ``out_dir`` does not show rank 0's files (no
        shared filesystem) gets a copy written there over ``torch.distributed``. ``forward_model`` is what to call for
        the forward (a DeepSpeed engine under ZeRO-3); it defaults to ``model``. An existing store is opened and
        checked against the fingerprint fields ``open_fields``.

        ``dtype`` is the precision the reference forward computes in: None for the model's own weights' dtype, else
        autocast to it (``bf16`` for a model that trains with ``bf16=True``). It is part of the fingerprint: a store
        recorded at another precision than the training forward's makes the replay term rounding noise at step 0.
        """
        return build_store(
            cls, model, replay, out_dir, k=k, batch_size=batch_size, chunk_size=chunk_size, dtype=dtype, extras=extras,
            topk=topk, topk_temperature=topk_temperature, reference=reference, rebuild=rebuild,
            forward_model=forward_model, keep_states_bytes=keep_states_bytes, open_fields=open_fields,
            progress=progress,
        )

    @classmethod
    def open_distributed(
        cls,
        path: str,
        fingerprint: dict | None = None,
        fields: Sequence[str] = FINGERPRINT_FIELDS,
        verify: bool = True,
    ) -> ReferenceStore:
        """:meth:`open` on every rank of a distributed run, with or without a shared filesystem; every rank calls it.

        Rank 0's store at ``path`` is the store: rank 0 checks it (fingerprint, sizes, checksums with ``verify``) and
        an error there is raised on every rank. A node whose ``path`` does not hold the same files (node-local disks)
        gets them from rank 0 over ``torch.distributed``, written by one of its ranks and checked against the
        manifest's checksums as they arrive. In one process this is :meth:`open`.
        """
        path = os.fspath(path)
        rank, world = dist_info()
        if world == 1:
            return cls.open(path, fingerprint, fields, verify)
        opened = {}

        def open_on_rank_0():
            if rank == 0:
                opened["store"] = cls.open(path, fingerprint, fields, verify)

        fail_together(open_on_rank_0)
        manifest = broadcast_json(opened["store"].manifest if rank == 0 else None, 0)
        sync_store(path, manifest)
        return opened["store"] if rank == 0 else cls.open(path, verify=False)


ReferenceStates = ReferenceStore  # the name of gere_hf 0.1
