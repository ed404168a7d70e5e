"""Reference activation store: what GeRe needs from the base model, recorded once and reused in every stage.

For every replay token and hidden dimension the store keeps a 2-bit label of the base model's last hidden state
(after the final norm) relative to per-dimension thresholds ``mean ± k·std`` computed over all replay tokens:
−1 if the value is ≤ lower, +1 if ≥ upper, 0 in between. That is all the threshold-margin loss needs, at 2 bits
instead of the 32 bits per element of fp32 per-sample files. Optional extras are stored only when a loss needs them:
fp16 hidden states (L1/L2 feature imitation) and top-k teacher log-probs with their ids (KL logit imitation).

Layout of a store directory (no pickle anywhere)::

    manifest.json         format version, fingerprint, shapes, k, sizes, checksums, build time (written last)
    stats.safetensors     float64 count/sum/sumsq/mean/var/std and float32 lower/upper, per hidden dimension
    index.safetensors     per-sample lengths and offsets into the flat files below
    tokens.bin            replay token ids, samples concatenated, in the narrowest integer type that holds the
                          vocabulary (uint16 up to 65,536 entries, else int32; ``token_dtype`` in the manifest)
    labels.bin            2-bit labels, 4 per byte, samples concatenated (memory-mapped; reading sample i
                          touches only its bytes)
    hidden.bin            optional, fp16 [tokens, H]
    topk_logprobs.bin     optional, fp32 [tokens, K];  topk_ids.bin optional, int32 [tokens, K]

A build is resumable and atomic: chunks of samples are written to ``.building/`` under temporary names and renamed
when complete; the final files are assembled from the chunks and ``manifest.json`` is written last, so an
interrupted build is never opened as complete and a resumed one ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save as save_np_bytes
from tqdm.auto import tqdm

from .losses import threshold_labels
from .models import find_final_norm, is_peft_model, unwrap_causal_lm
from .replay import ReplaySet

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # version 1: int32 token ids and no recorded precision
MANIFEST = "manifest.json"
BUILDING = ".building"
STORE_FILES = ("stats.safetensors", "index.safetensors", "tokens.bin", "labels.bin")
EXTRA_FILES = {"hidden": ("hidden.bin",), "topk": ("topk_logprobs.bin", "topk_ids.bin")}
KNOWN_EXTRAS = tuple(EXTRA_FILES)
FINGERPRINT_FIELDS = ("model_config", "model_weights", "tokenizer", "replay", "max_length", "layer", "k", "precision")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}
_LABEL_LUT = torch.tensor([0, 1, 0, -1], dtype=torch.int8)  # 2-bit code -> label; code 2 never occurs
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


class ReferenceStatesError(ValueError):
    """A store that cannot be built or opened as asked."""


class ReferenceStatesMismatch(ReferenceStatesError):
    """The store was built for another model, tokenizer, replay set or setting."""

    def __init__(self, path: str, differences: dict[str, tuple], detail: str | None = None):
        self.differences = differences
        lines = [f"  {name}: store has {got!r}, expected {want!r}" for name, (got, want) in differences.items()]
        fix = detail or "Rebuild it (rebuild=True, or `gere-hf cache ... --rebuild`) or point store_dir at a new directory."
        super().__init__(
            f"The reference store at {path} was built for something else; these fingerprint fields differ:\n"
            + "\n".join(lines) + "\n" + fix
        )


# ----------------------------------------------------------------------------------------------------------------------
# 2-bit labels
# ----------------------------------------------------------------------------------------------------------------------


def pack_labels(labels: torch.Tensor) -> np.ndarray:
    """Pack int8 labels in {−1, 0, 1} into bytes, 4 per byte (first element in the lowest bits)."""
    codes = (labels.reshape(-1).to(torch.int16) & 3).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, 4)
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    return packed.numpy()


def unpack_labels(packed: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_labels`, on whatever device ``packed`` lives: one fused shift-and-lookup."""
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 3
    labels = _LABEL_LUT.to(packed.device)[codes.long()].flatten(-2)
    return labels if numel is None else labels[..., :numel]


def packed_size(num_tokens: int, hidden_size: int) -> int:
    return (num_tokens * hidden_size + 3) // 4


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "architectures", "name_or_path",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_config_hash(model) -> str:
    config = unwrap_causal_lm(model).config.to_dict()
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return _sha(json.dumps(kept, sort_keys=True, default=str).encode())


def _base_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of the base model with PEFT names normalised, adapters left out."""
    params = []
    for name, param in unwrap_causal_lm(model).named_parameters():
        if "lora_" in name or "modules_to_save" in name or ".adapter" in name:
            continue
        params.append((name.replace(".base_layer", ""), param))
    return sorted(params, key=lambda kv: kv[0])


def model_weights_hash(model, max_params: int = 32, elements: int = 16) -> str:
    """Hash of a deterministic sample of the base weights: up to ``max_params`` tensors, ``elements`` values each."""
    params = _base_parameters(model)
    if len(params) > max_params:
        step = len(params) / max_params
        params = [params[int(i * step)] for i in range(max_params)]
    h = hashlib.sha256()
    for name, param in params:
        gather = contextlib.nullcontext()
        if getattr(param, "ds_numel", None) is not None and param.numel() == 0:  # ZeRO-3 partitioned
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param])
        with gather, torch.no_grad():
            flat = param.detach().reshape(-1)
            # Integer arithmetic: a float32 linspace rounds n - 1 up to n for tensors of more than 2**24 elements.
            steps = min(elements, flat.numel())
            idx = torch.arange(steps, dtype=torch.long) * (flat.numel() - 1) // max(steps - 1, 1)
            values = flat[idx.to(flat.device)].float().cpu().numpy()
            h.update(f"{name}{tuple(param.shape) if param.numel() else param.ds_shape}".encode())
            h.update(values.tobytes())
    return h.hexdigest()[:16]


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from a name ('bf16', 'bfloat16', 'fp32', ...) or a dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ReferenceStatesError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16 (fp32, bf16, fp16).")
    return _DTYPE_ALIASES[key]


def precision_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a precision ('float32', 'bfloat16', 'float16'), as stores record it."""
    dtype = as_dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise ReferenceStatesError(f"{dtype} is not a precision a reference forward can run at.")
    return _DTYPE_NAMES[dtype]


def model_precision(model) -> str:
    """The dtype of the base model's floating weights (PEFT adapters, often kept in fp32, left out)."""
    for _, param in _base_parameters(model):
        if param.is_floating_point():
            return precision_name(param.dtype)
    return "float32"


def compute_fingerprint(model, replay: ReplaySet, k: float = 1.0, precision: torch.dtype | str | None = None) -> dict:
    """What a store is checked against. ``precision`` is the dtype the reference forward computes in (default: the
    model's): a store recorded at fp32 and a model trained under bf16 autocast disagree by rounding noise."""
    layer, _ = find_final_norm(model)
    return {
        "model_config": model_config_hash(model),
        "model_weights": model_weights_hash(model),
        "tokenizer": replay.tokenizer_hash,
        "replay": replay.content_hash,
        "max_length": int(replay.max_length),
        "layer": layer,
        "k": float(k),
        "precision": precision_name(precision) if precision is not None else model_precision(model),
    }


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every id of a vocabulary of ``vocab_size`` entries."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def compare_fingerprints(stored: dict, expected: dict, fields: Sequence[str] = FINGERPRINT_FIELDS) -> dict:
    return {f: (stored.get(f), expected.get(f)) for f in fields if f in expected and stored.get(f) != expected.get(f)}


# ----------------------------------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------------------------------


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a partial file would only take space a full disk needs back
        raise
    os.replace(tmp, path)


def _atomic_save_np(tensors: dict[str, np.ndarray], path: str) -> None:
    # Serialised in memory and written by Python: a full disk is an OSError(ENOSPC), not a SafetensorError.
    _atomic_write_bytes(path, save_np_bytes(tensors))


def _preallocate(f, size: int) -> None:
    """Reserve the blocks of a file that is about to be memory-mapped and written.

    Writing into a sparse mapping on a full disk kills the process with SIGBUS; reserved up front, a full disk is an
    OSError(ENOSPC) here, which the build reports and can resume from.
    """
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    f.truncate(size)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass(frozen=True)
class _Plan:
    """Samples in length-sorted chunks, each chunk split into forward batches; a pure function of lengths."""

    chunks: tuple[tuple[int, ...], ...]
    batch_size: int

    @classmethod
    def make(cls, lengths: Sequence[int], batch_size: int, chunk_size: int) -> _Plan:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        chunks = tuple(tuple(order[s : s + chunk_size]) for s in range(0, len(order), chunk_size))
        return cls(chunks, batch_size)

    def batches(self, chunk: int) -> list[tuple[int, ...]]:
        samples = self.chunks[chunk]
        return [samples[s : s + self.batch_size] for s in range(0, len(samples), self.batch_size)]

    def digest(self) -> str:
        return _sha(json.dumps([self.chunks, self.batch_size]).encode())


# ----------------------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------------------


class ReferenceStates:
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
            raise ReferenceStatesError(
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
            raise ReferenceStatesMismatch(self.path, differences)

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
        return os.path.isfile(os.path.join(path, MANIFEST))

    @classmethod
    def open(
        cls,
        path: str,
        fingerprint: dict | None = None,
        fields: Sequence[str] = FINGERPRINT_FIELDS,
        verify: bool = True,
    ) -> ReferenceStates:
        """Open a complete store; check it against ``fingerprint`` (only ``fields``) and, with ``verify``, checksums."""
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            if os.path.isdir(os.path.join(path, BUILDING)):
                raise ReferenceStatesError(
                    f"The reference store at {path} is incomplete: its build was interrupted. Run the build again "
                    "with the same settings to resume it."
                )
            raise ReferenceStatesError(f"{path} is not a reference store (no {MANIFEST}). Build one with `gere-hf cache`.")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ReferenceStatesError(f"The manifest of {path} is corrupted ({e}). Rebuild the store.") from e
        if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ReferenceStatesError(
                f"The store at {path} has format version {manifest.get('format_version')}, this gere_hf reads "
                f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Rebuild it with this version."
            )
        for name, info in manifest["files"].items():
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise ReferenceStatesError(f"The store at {path} lacks {name}. Rebuild the store.")
            size = os.path.getsize(file_path)
            if size != info["bytes"]:
                raise ReferenceStatesError(
                    f"{file_path} is truncated or altered: {size} bytes, the manifest records {info['bytes']}. "
                    "Rebuild the store."
                )
            if verify and _file_digest(file_path) != info["blake2b"]:
                raise ReferenceStatesError(
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
                raise ReferenceStatesMismatch(path, diff)
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
        progress: bool = True,
    ) -> ReferenceStates:
        """Record the reference states of ``model`` on ``replay`` into ``out_dir`` (or open it if already built).

        Under ``torch.distributed`` every rank calls this; each forwards a disjoint set of chunks, the main process
        reduces the statistics (in chunk order, so the result is byte-identical to a 1-process build) and writes
        the store, the others wait and open it. ``forward_model`` is what to call for the forward (a DeepSpeed
        engine under ZeRO-3); it defaults to ``model``.

        ``dtype`` is the precision the reference forward computes in: None for the model's own weights' dtype, else
        autocast to it (``bf16`` for a model that trains with ``bf16=True``). It is part of the fingerprint: a store
        recorded at another precision than the training forward's makes the replay term rounding noise at step 0.
        """
        out_dir = os.fspath(out_dir)
        extras = tuple(dict.fromkeys(extras))
        _validate_build_args(k, batch_size, chunk_size, extras, topk, reference, len(replay))
        find_final_norm(model)  # a clear error before any work
        dtype = as_dtype(dtype)
        fingerprint = compute_fingerprint(model, replay, k, precision=dtype)
        if os.path.isdir(out_dir) and cls.is_store(out_dir):
            if not rebuild:
                store = cls.open(out_dir, fingerprint)
                store.require_extras(extras, topk if "topk" in extras else None,
                                     topk_temperature if "topk" in extras else None)
                return store
        elif os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isdir(os.path.join(out_dir, BUILDING)):
            raise ReferenceStatesError(
                f"The output directory {out_dir} holds something other than a reference store "
                f"({', '.join(sorted(os.listdir(out_dir))[:5])}). Give an empty or new directory."
            )
        rank, world = _dist_info()
        builder = _Builder(model, forward_model or model, replay, out_dir, fingerprint, k, batch_size, chunk_size,
                           dtype, extras, topk, topk_temperature, reference, progress and rank == 0)
        builder.check_space()
        builder.run_chunks(rank, world)
        _barrier()
        if rank == 0:
            try:
                builder.assemble()
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise builder.disk_full() from e
                raise
        _barrier()
        return cls.open(out_dir, fingerprint, verify=False)


def _validate_build_args(k, batch_size, chunk_size, extras, topk, reference, num_samples) -> None:
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ReferenceStatesError(f"k (the threshold width in standard deviations) must be > 0, got {k!r}.")
    if batch_size < 1 or chunk_size < 1:
        raise ReferenceStatesError(f"batch_size and chunk_size must be ≥ 1, got {batch_size} and {chunk_size}.")
    unknown = [e for e in extras if e not in KNOWN_EXTRAS]
    if unknown:
        raise ReferenceStatesError(f"Unknown extras {unknown}; choose from {list(KNOWN_EXTRAS)}.")
    if "topk" in extras and topk < 1:
        raise ReferenceStatesError(f"topk must be ≥ 1 when storing teacher log-probs, got {topk}.")
    if reference not in ("base", "current"):
        raise ReferenceStatesError(f"reference must be 'base' or 'current', got {reference!r}.")
    if num_samples == 0:
        raise ReferenceStatesError("The replay set is empty; there is nothing to record.")


class _Builder:
    def __init__(self, model, forward_model, replay, out_dir, fingerprint, k, batch_size, chunk_size, dtype, extras,
                 topk, topk_temperature, reference, progress):
        self.model = model
        self.forward_model = forward_model
        self.replay = replay
        self.out_dir = out_dir
        self.work = os.path.join(out_dir, BUILDING)
        self.fingerprint = fingerprint
        self.k = float(k)
        self.extras = extras
        self.topk = int(topk) if "topk" in extras else 0
        self.topk_temperature = float(topk_temperature)
        self.reference = reference
        self.progress = progress
        config = unwrap_causal_lm(model).config
        self.hidden_size = int(config.hidden_size)
        self.token_dtype = token_dtype_for(max(int(getattr(config, "vocab_size", 0) or 0),
                                               max((max(ids) for ids in replay.input_ids if ids), default=0) + 1))
        self.dtype = as_dtype(dtype)
        self.plan = _Plan.make(replay.lengths, batch_size, chunk_size)
        self.started = time.time()

    # -- space --------------------------------------------------------------------------------------------------------

    def needed_bytes(self) -> int:
        tokens, h = self.replay.num_tokens, self.hidden_size
        id_bytes = tokens * self.token_dtype.itemsize
        final = id_bytes + packed_size(tokens, h) + 64 * h
        if "hidden" in self.extras:
            final += tokens * h * 2
        if self.topk:
            final += tokens * self.topk * 8
        work = tokens * h * 4 + (final - id_bytes - packed_size(tokens, h))  # raw fp32 chunks and their extras
        return final + work

    def check_space(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        need = self.needed_bytes() - _dir_bytes(self.work)
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise ReferenceStatesError(
                f"Not enough disk space for the reference store in {self.out_dir}: the build needs about "
                f"{need / 2**20:.1f} MiB more, {free / 2**20:.1f} MiB are free. Free space or choose another store_dir."
            )

    def disk_full(self) -> ReferenceStatesError:
        return ReferenceStatesError(
            f"The disk filled up while building the reference store in {self.out_dir}. The build needs about "
            f"{self.needed_bytes() / 2**20:.1f} MiB in all; the finished chunks are kept in {self.work}. "
            "Free space and run the build again to resume it."
        )

    # -- forward ------------------------------------------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        plan_path = os.path.join(self.work, "plan.json")
        plan = {"plan": self.plan.digest(), "fingerprint": self.fingerprint, "extras": list(self.extras),
                "topk": self.topk, "topk_temperature": self.topk_temperature,
                "dtype": str(self.dtype) if self.dtype else None}
        if os.path.isfile(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
            if old == plan:
                return
            logger.warning("The interrupted build in %s used other settings; starting it afresh.", self.work)
            for name in os.listdir(self.work):
                os.remove(os.path.join(self.work, name))
        _atomic_write_bytes(plan_path, json.dumps(plan, sort_keys=True).encode())

    def _chunk_path(self, c: int, kind: str) -> str:
        return os.path.join(self.work, f"chunk-{c:05d}.{kind}")

    def _chunk_done(self, c: int) -> bool:
        return os.path.isfile(self._chunk_path(c, "stats.safetensors"))

    def run_chunks(self, rank: int, world: int) -> None:
        if rank == 0:
            self._prepare_work_dir()
        _barrier()
        todo_by_rank = [
            [c for c in range(len(self.plan.chunks)) if c % world == r and not self._chunk_done(c)] for r in range(world)
        ]
        _barrier()  # every rank has seen the same finished chunks before any rank adds one
        mine = [c for c in range(len(self.plan.chunks)) if c % world == rank]
        todo = todo_by_rank[rank]
        padding_forwards = padding_forwards_per_rank(self.plan, todo_by_rank)[rank]
        done_tokens = sum(int(self.replay.lengths[i]) for c in mine if c not in todo for i in self.plan.chunks[c])
        total_tokens = sum(int(self.replay.lengths[i]) for c in mine for i in self.plan.chunks[c])
        bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, disable=not self.progress,
                   desc="Recording reference states")
        model = self.model
        was_training = model.training
        model.eval()
        captured: list[torch.Tensor] = []
        _, norm = find_final_norm(model)
        handle = norm.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        t0 = time.time()
        try:
            with self._reference_context(), torch.no_grad():
                for c in todo:
                    self._run_chunk(c, captured, bar)
                    bar.set_postfix(tok_per_s=f"{(bar.n - done_tokens) / max(time.time() - t0, 1e-9):.0f}")
                for _ in range(padding_forwards):
                    self._forward(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
                    captured.clear()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self.disk_full() from e
            raise
        finally:
            handle.remove()
            model.train(was_training)
            bar.close()

    def _reference_context(self):
        stack = contextlib.ExitStack()
        if self.reference == "base" and is_peft_model(self.model):
            peft_model = self.model if hasattr(self.model, "disable_adapter") else self.model.module
            stack.enter_context(peft_model.disable_adapter())
        device = next(self.model.parameters()).device
        if self.dtype is not None and precision_name(self.dtype) != model_precision(self.model):
            stack.enter_context(torch.autocast(device.type, dtype=self.dtype))
        else:
            # The weights' own precision: an ambient autocast (the caller's) must not change what is recorded.
            stack.enter_context(torch.autocast(device.type, enabled=False))
        return stack

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        device = next(self.model.parameters()).device
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "use_cache": False}
        if not self.topk:
            kwargs["logits_to_keep"] = 1  # the LM head is not needed: skip its cost where the model allows
        # Inside train() accelerate has wrapped the model's forward in its mixed-precision autocast; the original
        # forward runs at the precision this build was asked for (_reference_context), whatever the training's.
        forward = getattr(self.forward_model, "_original_forward", None) or self.forward_model
        try:
            return forward(**kwargs)
        except TypeError:
            kwargs.pop("logits_to_keep", None)
            return forward(**kwargs)

    def _run_chunk(self, c: int, captured: list, bar) -> None:
        pad_id = 0  # any id: padded positions are masked and never read back
        raws, hiddens, tlps, tids = [], [], [], []
        total = np.zeros(self.hidden_size, dtype=np.float64)
        total_sq = np.zeros(self.hidden_size, dtype=np.float64)
        count = 0
        for batch in self.plan.batches(c):
            lengths = [self.replay.lengths[i] for i in batch]
            width = max(lengths)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[row]] = torch.tensor(self.replay.input_ids[i])
                mask[row, : lengths[row]] = 1
            captured.clear()
            out = self._forward(ids, mask)
            hidden = captured[-1].detach().float().cpu()
            logits = out.logits if self.topk else None
            for row, n in enumerate(lengths):
                h = hidden[row, :n]
                raws.append(h.numpy())
                h64 = h.double()
                total += h64.sum(0).numpy()
                total_sq += (h64 * h64).sum(0).numpy()
                count += n
                if "hidden" in self.extras:
                    hiddens.append(h.half().numpy())
                if self.topk:
                    lp = torch.log_softmax(logits[row, :n].float() / self.topk_temperature, dim=-1)
                    values, indices = lp.topk(self.topk, dim=-1)
                    tlps.append(values.cpu().numpy())
                    tids.append(indices.to(torch.int32).cpu().numpy())
            bar.update(sum(lengths))
        _atomic_write_bytes(self._chunk_path(c, "raw"), np.concatenate(raws).tobytes())
        if hiddens:
            _atomic_write_bytes(self._chunk_path(c, "hidden"), np.concatenate(hiddens).tobytes())
        if tlps:
            _atomic_write_bytes(self._chunk_path(c, "topk_lp"), np.concatenate(tlps).tobytes())
            _atomic_write_bytes(self._chunk_path(c, "topk_ids"), np.concatenate(tids).tobytes())
        # The stats file is the chunk's completion mark: written last.
        _atomic_save_np({"sum": total, "sumsq": total_sq, "count": np.array([count], dtype=np.int64)},
                        self._chunk_path(c, "stats.safetensors"))

    # -- assembly (main process) --------------------------------------------------------------------------------------

    def assemble(self) -> None:
        missing = [c for c in range(len(self.plan.chunks)) if not self._chunk_done(c)]
        if missing:
            raise ReferenceStatesError(f"Chunks {missing[:5]} of the build in {self.work} are missing; run it again.")
        h = self.hidden_size
        total = np.zeros(h, dtype=np.float64)
        total_sq = np.zeros(h, dtype=np.float64)
        count = 0
        for c in range(len(self.plan.chunks)):  # a fixed order: the same sums whatever the number of ranks
            s = load_np(self._chunk_path(c, "stats.safetensors"))
            total += s["sum"]
            total_sq += s["sumsq"]
            count += int(s["count"][0])
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)  # population variance, E[x²] − mean², as the paper
        std = np.sqrt(var)
        lower = (mean - self.k * std).astype(np.float32)
        upper = (mean + self.k * std).astype(np.float32)

        lengths = np.array(self.replay.lengths, dtype=np.int64)
        token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        label_sizes = np.array([packed_size(int(n), h) for n in lengths], dtype=np.int64)
        label_offsets = np.concatenate([[0], np.cumsum(label_sizes)]).astype(np.int64)
        num_tokens = int(token_offsets[-1])

        # Existing finals are unlinked before anything is written so an interrupted rebuild is never "complete".
        for name in (MANIFEST,) + STORE_FILES + sum(EXTRA_FILES.values(), ()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out_dir, name))

        def final_map(name, dtype, numel):
            path = os.path.join(self.work, name)
            with open(path, "wb") as f:
                _preallocate(f, numel * np.dtype(dtype).itemsize)
            return np.memmap(path, dtype=dtype, mode="r+", shape=(numel,)) if numel else None

        tokens = final_map("tokens.bin", self.token_dtype, num_tokens)
        labels = final_map("labels.bin", np.uint8, int(label_offsets[-1]))
        hidden = final_map("hidden.bin", np.float16, num_tokens * h) if "hidden" in self.extras else None
        tlp = final_map("topk_logprobs.bin", np.float32, num_tokens * self.topk) if self.topk else None
        tid = final_map("topk_ids.bin", np.int32, num_tokens * self.topk) if self.topk else None
        label_counts = np.zeros(3, dtype=np.int64)
        lower_t, upper_t = torch.from_numpy(lower), torch.from_numpy(upper)
        for i, ids in enumerate(self.replay.input_ids):
            tokens[token_offsets[i] : token_offsets[i + 1]] = np.asarray(ids, dtype=self.token_dtype)
        for c, samples in enumerate(self.plan.chunks):
            raw = np.fromfile(self._chunk_path(c, "raw"), dtype=np.float32).reshape(-1, h)
            extra_h = np.fromfile(self._chunk_path(c, "hidden"), dtype=np.float16).reshape(-1, h) if hidden is not None else None
            if tlp is not None:
                c_lp = np.fromfile(self._chunk_path(c, "topk_lp"), dtype=np.float32).reshape(-1, self.topk)
                c_id = np.fromfile(self._chunk_path(c, "topk_ids"), dtype=np.int32).reshape(-1, self.topk)
            row = 0
            for i in samples:
                n = int(lengths[i])
                lab = threshold_labels(torch.from_numpy(raw[row : row + n]), lower_t, upper_t)
                label_counts += np.bincount((lab.reshape(-1).long() + 1).numpy(), minlength=3)
                labels[label_offsets[i] : label_offsets[i + 1]] = pack_labels(lab)
                a, b = token_offsets[i], token_offsets[i + 1]
                if extra_h is not None:
                    hidden[a * h : b * h] = extra_h[row : row + n].reshape(-1)
                if tlp is not None:
                    tlp[a * self.topk : b * self.topk] = c_lp[row : row + n].reshape(-1)
                    tid[a * self.topk : b * self.topk] = c_id[row : row + n].reshape(-1)
                row += n
        for m in (tokens, labels, hidden, tlp, tid):
            if m is not None:
                m.flush()
        del tokens, labels, hidden, tlp, tid
        _atomic_save_np(
            {"count": np.array([count], dtype=np.int64), "sum": total, "sumsq": total_sq, "mean": mean, "var": var,
             "std": std, "lower": lower, "upper": upper},
            os.path.join(self.work, "stats.safetensors"),
        )
        _atomic_save_np({"lengths": lengths, "token_offsets": token_offsets, "label_offsets": label_offsets},
                        os.path.join(self.work, "index.safetensors"))
        names = list(STORE_FILES) + [n for e in self.extras for n in EXTRA_FILES[e]]
        files = {}
        for name in names:
            src = os.path.join(self.work, name)
            files[name] = {"bytes": os.path.getsize(src), "blake2b": _file_digest(src)}
            os.replace(src, os.path.join(self.out_dir, name))
        bytes_on_disk = sum(f["bytes"] for f in files.values())
        label_bytes = files["labels.bin"]["bytes"]
        seconds = time.time() - self.started
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_samples": len(lengths),
            "num_tokens": num_tokens,
            "hidden_size": h,
            "token_dtype": self.token_dtype.name,
            "precision": self.fingerprint["precision"],
            "max_length": self.replay.max_length,
            "layer": self.fingerprint["layer"],
            "k": self.k,
            "reference": self.reference,
            "extras": list(self.extras),
            "topk": self.topk,
            "topk_temperature": self.topk_temperature if self.topk else None,
            "files": files,
            "bytes_on_disk": bytes_on_disk,
            "bits_per_element": 8 * label_bytes / max(num_tokens * h, 1),
            "official_fp32_bytes": num_tokens * h * 4,
            "label_fractions": {"negative": float(label_counts[0] / max(label_counts.sum(), 1)),
                                "neutral": float(label_counts[1] / max(label_counts.sum(), 1)),
                                "positive": float(label_counts[2] / max(label_counts.sum(), 1))},
            "build": {"seconds": round(seconds, 3), "tokens_per_second": round(num_tokens / max(seconds, 1e-9), 1)},
        }
        _atomic_write_bytes(os.path.join(self.out_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.work, ignore_errors=True)
        logger.info(
            "Reference store %s: %d samples, %d tokens, %.2f MiB on disk (%.2f bits/element; fp32 per-sample files "
            "would need %.1f MiB), %.1f s.",
            self.out_dir, len(lengths), num_tokens, bytes_on_disk / 2**20, manifest["bits_per_element"],
            num_tokens * h * 4 / 2**20, seconds,
        )


def _dir_bytes(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def padding_forwards_per_rank(plan: _Plan, todo_by_rank: Sequence[Sequence[int]]) -> list[int]:
    """How many empty forwards each rank adds so that every rank runs the same number of forwards.

    Under ZeRO-3 and FSDP every forward of a sharded model gathers parameters collectively, and DDP's forward
    broadcasts buffers: a rank that stopped early would leave the others waiting. The plan is known to every rank,
    so each pads up to the largest count without communicating. One process needs none.
    """
    counts = [sum(len(plan.batches(c)) for c in chunks) for chunks in todo_by_rank]
    if len(counts) <= 1:
        return [0] * len(counts)
    return [max(counts) - n for n in counts]
