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
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save as save_np_bytes
from tqdm.auto import tqdm

from .locks import LOCK_FILE, folder_lock
from .losses import threshold_labels
from .models import find_final_norm, is_peft_model, unwrap_causal_lm, virtual_token_count
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
    return _pack_codes(labels).cpu().numpy()


def _pack_codes(labels: torch.Tensor) -> torch.Tensor:
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


def _adapter_parameter_ids(model) -> set[int]:
    """The parameters PEFT declares as adapter state: every tuner layer and auxiliary wrapper (modules_to_save,
    trainable tokens) names its adapter attributes in ``adapter_layer_names`` and ``other_param_names``, so any
    present or future method that follows PEFT's layer protocol is covered without a list of name prefixes here.
    Adaption prompt's attention wrappers predate the protocol: their two parameters are named here."""
    ids: set[int] = set()
    for module in model.modules():
        names = (*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ()))
        if _is_adaption_prompt_wrapper(module):
            names = (*names, "adaption_prompt", "adaption_gate")
        for path in names:
            target = module
            for part in path.split("."):
                target = getattr(target, part, None)
            if isinstance(target, torch.nn.Parameter):
                ids.add(id(target))
            elif isinstance(target, torch.nn.Module):
                ids.update(id(p) for p in target.parameters())
    return ids


def _is_adaption_prompt_wrapper(module) -> bool:
    return isinstance(getattr(module, "adaption_prompt", None), torch.nn.Parameter) and hasattr(module, "model")


def _base_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of the base model under their names without PEFT (the wrapped original module of a tuner layer,
    of modules_to_save and of adaption prompt's attention is where the base weights live), adapters left out."""
    base = unwrap_causal_lm(model)
    adapters = _adapter_parameter_ids(model)
    wrapped = [f"{name}.model." for name, module in base.named_modules() if _is_adaption_prompt_wrapper(module)]
    params = []
    for name, param in base.named_parameters():
        if id(param) in adapters:
            continue
        for prefix in wrapped:
            if name.startswith(prefix):
                name = prefix[: -len("model.")] + name[len(prefix):]
        params.append((name.replace(".base_layer", "").replace(".original_module", ""), param))
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
            # FSDP2 shards parameters as DTensors: the sampled values are read from the whole tensor, so a sharded
            # model hashes like the same model unsharded (full_tensor is a collective: every rank hashes, in order).
            flat = (param.full_tensor() if _is_dtensor(param) else param).detach().reshape(-1)
            # Integer arithmetic: a float32 linspace rounds n - 1 up to n for tensors of more than 2**24 elements.
            steps = min(elements, flat.numel())
            idx = torch.arange(steps, dtype=torch.long) * (flat.numel() - 1) // max(steps - 1, 1)
            values = flat[idx.to(flat.device)].float().cpu().numpy()
            h.update(f"{name}{tuple(param.shape) if param.numel() else param.ds_shape}".encode())
            h.update(values.tobytes())
    return h.hexdigest()[:16]


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(tensor, DTensor)


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
        keep_states_bytes: int | None = None,
        open_fields: Sequence[str] = FINGERPRINT_FIELDS,
        progress: bool = True,
    ) -> ReferenceStates:
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
        out_dir = os.fspath(out_dir)
        extras = tuple(dict.fromkeys(extras))
        _validate_build_args(k, batch_size, chunk_size, extras, topk, reference, len(replay))
        if keep_states_bytes is not None and keep_states_bytes < 0:
            raise ReferenceStatesError(f"keep_states_bytes must be ≥ 0 (or None), got {keep_states_bytes}.")
        find_final_norm(model)  # a clear error before any work
        dtype = as_dtype(dtype)
        fingerprint = compute_fingerprint(model, replay, k, precision=dtype)
        rank, world = _dist_info()
        _agree(lambda: _check_build_dir(out_dir))
        # One build of a store at a time: another launch sharing store_dir waits here until this one's build ends,
        # then opens what it built. Rank 0 holds the lock for its launch (its ranks build together).
        with folder_lock(out_dir, "reference store build", wait=True) if rank == 0 else contextlib.nullcontext():
            # Rank 0's directory decides whether there is a store to open: a node-local directory elsewhere may be
            # empty.
            exists = _broadcast_json(cls.is_store(out_dir), 0)
            if exists and not rebuild:
                store = cls.open_distributed(out_dir, fingerprint, fields=open_fields)
                store.require_extras(extras, topk if "topk" in extras else None,
                                     topk_temperature if "topk" in extras else None)
                return store
            builder = _Builder(model, forward_model or model, replay, out_dir, fingerprint, k, batch_size, chunk_size,
                               dtype, extras, topk, topk_temperature, reference, keep_states_bytes,
                               progress and rank == 0)
            leaders = _directory_leaders(out_dir)
            _agree(lambda: builder.prepare() if leaders[rank] == rank else None)  # one rank per directory
            _barrier()
            builder.run(rank, world)
            builder.collect_chunks(rank, world)
            if rank == 0:
                builder.assemble()
            _barrier()
            if world > 1:
                manifest = _broadcast_json(_read_manifest(out_dir) if rank == 0 else None, 0)
                _send_store(out_dir, manifest, receivers=sorted({r for r in leaders if r != 0}))
                if leaders[rank] == rank and rank != 0:
                    shutil.rmtree(builder.work, ignore_errors=True)
                _barrier()
            return cls.open(out_dir, fingerprint, verify=False)

    @classmethod
    def open_distributed(
        cls,
        path: str,
        fingerprint: dict | None = None,
        fields: Sequence[str] = FINGERPRINT_FIELDS,
        verify: bool = True,
    ) -> ReferenceStates:
        """:meth:`open` on every rank of a distributed run, with or without a shared filesystem; every rank calls it.

        Rank 0's store at ``path`` is the store: rank 0 checks it (fingerprint, sizes, checksums with ``verify``) and
        an error there is raised on every rank. A node whose ``path`` does not hold the same files (node-local disks)
        gets them from rank 0 over ``torch.distributed``, written by one of its ranks and checked against the
        manifest's checksums as they arrive. In one process this is :meth:`open`.
        """
        path = os.fspath(path)
        rank, world = _dist_info()
        if world == 1:
            return cls.open(path, fingerprint, fields, verify)
        opened = {}

        def open_on_rank_0():
            if rank == 0:
                opened["store"] = cls.open(path, fingerprint, fields, verify)

        _agree(open_on_rank_0)
        manifest = _broadcast_json(opened["store"].manifest if rank == 0 else None, 0)
        _sync_store(path, manifest)
        return opened["store"] if rank == 0 else cls.open(path, verify=False)


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


def _check_build_dir(out_dir: str) -> None:
    """Refuse a directory that holds anything but a store or an unfinished build (its files are left alone)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReferenceStatesError(f"The store directory {out_dir} is a file. Give a directory's path (store_dir).")
    if ReferenceStates.is_store(out_dir) or not os.path.isdir(out_dir) or os.path.isdir(os.path.join(out_dir, BUILDING)):
        return
    names = [n for n in os.listdir(out_dir) if not n.startswith(_PROBE_PREFIX) and n != LOCK_FILE]
    if names:
        raise ReferenceStatesError(
            f"The output directory {out_dir} holds something other than a reference store "
            f"({', '.join(sorted(names)[:5])}). Give an empty or new directory."
        )


# What .building holds: 1 = fp32 states per chunk, labelled at assembly (before the device-resident build);
# 2 = per chunk the float64 statistics, the extras and the packed labels. Part of plan.json: a layout-1 build left
# over is started afresh.
_BUILD_LAYOUT = 2
_LABEL_PIECE_ELEMENTS = 1 << 24  # labelled at a time: bounds the device's float32 temporaries to 64 MiB


class _Builder:
    """One build: pass 1 forwards every chunk (statistics, extras; states kept on the device while they fit), the
    thresholds come from all chunks' statistics, pass 2 labels and packs each chunk (from its kept states, or from
    a second forward), and the main process assembles the final files from the chunks."""

    def __init__(self, model, forward_model, replay, out_dir, fingerprint, k, batch_size, chunk_size, dtype, extras,
                 topk, topk_temperature, reference, keep_states_bytes, progress):
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
        self.keep_states_bytes = keep_states_bytes
        self.progress = progress
        config = unwrap_causal_lm(model).config
        self.hidden_size = int(config.hidden_size)
        self.token_dtype = token_dtype_for(max(int(getattr(config, "vocab_size", 0) or 0),
                                               max((max(ids) for ids in replay.input_ids if ids), default=0) + 1))
        self.dtype = as_dtype(dtype)
        self.plan = _Plan.make(replay.lengths, batch_size, chunk_size)
        # A prompt-learning PEFT model recorded with its adapter (reference "current") prepends virtual tokens: the
        # store holds the text's positions only, as the trainer compares them.
        self.skip = virtual_token_count(model) if reference == "current" else 0
        self.started = time.time()
        self.kept: dict[int, torch.Tensor] = {}  # chunk -> its states [tokens, H] on the device, in the forward's dtype
        self.chunk_stats: dict[int, dict[str, np.ndarray]] = {}
        self.stats: dict[str, np.ndarray] | None = None  # the store's statistics and thresholds, once known
        self.forwards = {"statistics": 0, "labels": 0, "padding": 0}  # batches forwarded by this rank, per purpose
        # Rank 0's wall seconds per phase: where a build's time goes beyond its forwards (docs/benchmarks.md).
        self.phase_seconds = {"prepare": 0.0, "record": 0.0, "label": 0.0, "assemble": 0.0}

    # -- space --------------------------------------------------------------------------------------------------------

    def needed_bytes(self) -> int:
        """Disk the build needs at its peak (assembly): the final files, and the chunk files they are copied from.
        No hidden states ever go to disk."""
        tokens, h, n = self.replay.num_tokens, self.hidden_size, len(self.replay)
        labels = packed_size(tokens, h) + n  # at most one partial byte per sample
        extras = (tokens * h * 2 if "hidden" in self.extras else 0) + tokens * self.topk * 8
        final = tokens * self.token_dtype.itemsize + labels + extras + 64 * h
        work = labels + extras + 24 * h * len(self.plan.chunks)  # chunk files: labels, extras, float64 statistics
        return final + work

    def check_space(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        need = self.needed_bytes() - _dir_bytes(self.work)
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise ReferenceStatesError(
                f"Not enough disk space for the reference store in {self.out_dir}: the build needs about "
                f"{_mib(need)} MiB more, {_mib(free)} MiB are free. Free space or choose another store_dir."
            )

    def disk_full(self) -> ReferenceStatesError:
        return ReferenceStatesError(
            f"The disk filled up while building the reference store in {self.out_dir}. The build needs about "
            f"{_mib(self.needed_bytes())} MiB in all; the finished chunks are kept in {self.work}. "
            "Free space and run the build again to resume it."
        )

    @contextlib.contextmanager
    def _disk_errors(self):
        try:
            yield
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self.disk_full() from e
            raise

    # -- the work directory -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The space check and ``.building/`` (kept if it holds an interrupted build of the same settings)."""
        self.check_space()
        os.makedirs(self.work, exist_ok=True)
        plan_path = os.path.join(self.work, "plan.json")
        plan = {"plan": self.plan.digest(), "fingerprint": self.fingerprint, "extras": list(self.extras),
                "topk": self.topk, "topk_temperature": self.topk_temperature,
                "dtype": str(self.dtype) if self.dtype else None, "layout": _BUILD_LAYOUT}
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

    def _chunk_kinds(self) -> list[str]:
        """A chunk's files in the order they are written; the last of each pass marks it done."""
        kinds = ["hidden"] if "hidden" in self.extras else []
        kinds += ["topk_lp", "topk_ids"] if self.topk else []
        return kinds + ["stats.safetensors", "labels.safetensors"]

    def _recorded(self, c: int) -> bool:
        return os.path.isfile(self._chunk_path(c, "stats.safetensors"))

    def _labelled(self, c: int) -> bool:
        return os.path.isfile(self._chunk_path(c, "labels.safetensors"))

    # -- the two passes -----------------------------------------------------------------------------------------------

    def run(self, rank: int, world: int) -> None:
        """Both passes over this rank's chunks (``c % world == rank``); collective: every rank calls it."""
        mine = [c for c in range(len(self.plan.chunks)) if c % world == rank]
        to_record = [c for c in mine if not self._recorded(c)]
        done_tokens = sum(self._tokens(c) for c in mine if c not in to_record)
        bar = tqdm(total=sum(self._tokens(c) for c in mine), initial=done_tokens, unit="tok", unit_scale=True,
                   disable=not self.progress, desc="Recording reference states")
        model = self.model
        was_training = model.training
        model.eval()
        captured: list[torch.Tensor] = []
        _, norm = find_final_norm(model)
        handle = norm.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            with self._disk_errors(), self._reference_context(), torch.no_grad():
                budget = self._state_budget()
                padding = _padding_to_max(sum(len(self.plan.batches(c)) for c in to_record))
                t0 = time.time()
                self.phase_seconds["prepare"] = round(t0 - self.started, 3)
                for c in to_record:
                    self._record_chunk(c, captured, budget, bar)
                    bar.set_postfix(tok_per_s=f"{(bar.n - done_tokens) / max(time.time() - t0, 1e-9):.0f}")
                self._padding_forwards(padding, captured)
                self.stats = self._reduce_statistics(mine, world)
                t1 = time.time()
                self.phase_seconds["record"] = round(t1 - t0, 3)
                to_label = [c for c in mine if not self._labelled(c)]
                again = [c for c in to_label if c not in self.kept]
                padding = _padding_to_max(sum(len(self.plan.batches(c)) for c in again))
                if again:
                    logger.info("Reference store: %d of %d chunks did not stay on the device (keep_states_bytes); "
                                "forwarding them again for their labels.", len(again), len(to_label))
                for c in to_label:
                    self._label_chunk(c, captured)
                self._padding_forwards(padding, captured)
                self.phase_seconds["label"] = round(time.time() - t1, 3)
        finally:
            handle.remove()
            self.kept.clear()
            model.train(was_training)
            bar.close()

    def _tokens(self, c: int) -> int:
        return sum(int(self.replay.lengths[i]) for i in self.plan.chunks[c])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _state_budget(self) -> int:
        """Bytes of states that may wait on the device for their labels."""
        if self.keep_states_bytes is not None:
            return int(self.keep_states_bytes)
        device = self._device()
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0]) // 4
        return _available_host_memory() // 4

    def _reference_context(self):
        stack = contextlib.ExitStack()
        if self.reference == "base" and is_peft_model(self.model):
            peft_model = self.model if hasattr(self.model, "disable_adapter") else self.model.module
            stack.enter_context(_adapters_disabled(peft_model))
        device = self._device()
        if self.dtype is not None and precision_name(self.dtype) != _compute_precision(self.model):
            stack.enter_context(torch.autocast(device.type, dtype=self.dtype))
        else:
            # The weights' own precision: an ambient autocast (the caller's) must not change what is recorded.
            stack.enter_context(torch.autocast(device.type, enabled=False))
        for module in dict.fromkeys([self.forward_model, self.model]):
            stack.enter_context(_without_accelerate_autocast(module))
        return stack

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: bool = False):
        device = self._device()
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "use_cache": False}
        if not logits:
            kwargs["logits_to_keep"] = 1  # the LM head is not needed: skip its cost where the model allows
        # The module is called (not its forward), so its own hooks run: FSDP2 gathers parameters in them. Inside
        # train() accelerate's autocast wrapper of forward is set aside (_reference_context): the forward runs at the
        # precision this build was asked for, whatever the training's.
        try:
            return self.forward_model(**kwargs)
        except TypeError:
            kwargs.pop("logits_to_keep", None)
            return self.forward_model(**kwargs)

    def _forward_batch(self, batch: Sequence[int], captured: list, logits: bool = False):
        """Forward one right-padded batch; returns (outputs, the final norm's output, the samples' lengths)."""
        lengths = [len(self.replay.input_ids[i]) for i in batch]
        ids, mask = self.replay.padded_batch(batch)
        captured.clear()
        out = self._forward(ids, mask, logits=logits)
        hidden = captured[-1].detach()[:, self.skip :]
        captured.clear()
        return out, hidden, lengths

    def _padding_forwards(self, count: int, captured: list) -> None:
        for _ in range(count):
            self._forward(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
            captured.clear()
        self.forwards["padding"] += count

    def _record_chunk(self, c: int, captured: list, budget: int, bar) -> None:
        """Pass 1 for chunk c: float64 sums on the device, the extras to the host, the states kept if they fit."""
        h = self.hidden_size
        total = total_sq = None
        count = 0
        keep = None
        states, hiddens, tlps, tids = [], [], [], []
        for batch in self.plan.batches(c):
            out, hidden, lengths = self._forward_batch(batch, captured, logits=bool(self.topk))
            self.forwards["statistics"] += 1
            if total is None:
                total = torch.zeros(h, dtype=torch.float64, device=hidden.device)
                total_sq = torch.zeros(h, dtype=torch.float64, device=hidden.device)
                need = self._tokens(c) * h * hidden.element_size()
                keep = sum(s.numel() * s.element_size() for s in self.kept.values()) + need <= budget
            rows = []
            for row, n in enumerate(lengths):
                x = hidden[row, :n]
                # Row by row, in sample order: the summation order of every float64 sum is that of the CPU build.
                x64 = x.double()
                total += x64.sum(0)
                total_sq += (x64 * x64).sum(0)
                count += n
                rows.append(x)
                if "hidden" in self.extras:
                    hiddens.append(x.float().half())
                if self.topk:
                    lp = torch.log_softmax(out.logits[row, self.skip : self.skip + n].float() / self.topk_temperature,
                                           dim=-1)
                    values, indices = lp.topk(self.topk, dim=-1)
                    tlps.append(values)
                    tids.append(indices.to(torch.int32))
            if keep:
                states.append(torch.cat(rows))  # a compact copy: the padded batch is freed
            bar.update(sum(lengths))
        if keep:
            self.kept[c] = torch.cat(states) if len(states) > 1 else states[0]
        if hiddens:
            _atomic_write_bytes(self._chunk_path(c, "hidden"), torch.cat(hiddens).cpu().numpy().tobytes())
        if tlps:
            _atomic_write_bytes(self._chunk_path(c, "topk_lp"), torch.cat(tlps).cpu().numpy().tobytes())
            _atomic_write_bytes(self._chunk_path(c, "topk_ids"), torch.cat(tids).cpu().numpy().tobytes())
        stats = {"sum": total.cpu().numpy(), "sumsq": total_sq.cpu().numpy(), "count": np.array([count], dtype=np.int64)}
        # The stats file is the mark of pass 1: written last.
        _atomic_save_np(stats, self._chunk_path(c, "stats.safetensors"))
        self.chunk_stats[c] = stats

    def _reduce_statistics(self, mine: Sequence[int], world: int) -> dict[str, np.ndarray]:
        """Every chunk's sums, added in chunk order on every rank: the same thresholds, whatever the world size."""
        h, n = self.hidden_size, len(self.plan.chunks)
        rows = np.zeros((n, 2 * h + 1), dtype=np.float64)
        for c in mine:
            s = self.chunk_stats.get(c) or load_np(self._chunk_path(c, "stats.safetensors"))
            rows[c] = np.concatenate([s["sum"], s["sumsq"], s["count"].astype(np.float64)])
        if world > 1:  # each chunk's row from the rank that recorded it (no filesystem needs to be shared)
            mine_rows = torch.from_numpy(rows).to(_comm_device())
            gathered = [torch.empty_like(mine_rows) for _ in range(world)]
            torch.distributed.all_gather(gathered, mine_rows)
            rows = np.stack([gathered[c % world][c].cpu().numpy() for c in range(n)])
        total = np.zeros(h, dtype=np.float64)
        total_sq = np.zeros(h, dtype=np.float64)
        count = 0
        for c in range(n):
            total += rows[c, :h]
            total_sq += rows[c, h : 2 * h]
            count += int(rows[c, 2 * h])
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)  # population variance, E[x²] − mean², as the paper
        std = np.sqrt(var)
        return {"count": np.array([count], dtype=np.int64), "sum": total, "sumsq": total_sq, "mean": mean, "var": var,
                "std": std, "lower": (mean - self.k * std).astype(np.float32),
                "upper": (mean + self.k * std).astype(np.float32)}

    def _chunk_states(self, c: int, captured: list) -> torch.Tensor:
        """Chunk c's states: those kept since pass 1, else from a second forward of its batches."""
        states = self.kept.pop(c, None)
        if states is not None:
            return states
        parts = []
        for batch in self.plan.batches(c):
            _, hidden, lengths = self._forward_batch(batch, captured)
            self.forwards["labels"] += 1
            parts.append(torch.cat([hidden[row, :n] for row, n in enumerate(lengths)]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _label_chunk(self, c: int, captured: list) -> None:
        """Pass 2 for chunk c: 2-bit labels computed and packed on the device; only the packed bytes leave it."""
        states = self._chunk_states(c, captured)
        h = self.hidden_size
        lower = torch.from_numpy(self.stats["lower"]).to(states.device)
        upper = torch.from_numpy(self.stats["upper"]).to(states.device)
        if h % 4 == 0:  # every sample ends on a byte: the chunk packs in pieces of any number of tokens
            step = max(1, _LABEL_PIECE_ELEMENTS // h)
            pieces = [(a, min(a + step, states.shape[0])) for a in range(0, states.shape[0], step)]
        else:  # each sample is packed on its own, from a byte boundary
            ends = np.cumsum([int(self.replay.lengths[i]) for i in self.plan.chunks[c]])
            pieces = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        negative = positive = torch.zeros((), dtype=torch.int64, device=states.device)
        packed = []
        for a, b in pieces:
            labels = threshold_labels(states[a:b], lower, upper)
            negative = negative + (labels == -1).sum()
            positive = positive + (labels == 1).sum()
            packed.append(_pack_codes(labels))
        del states
        elements = self._tokens(c) * h
        negative, positive = int(negative), int(positive)
        counts = np.array([negative, elements - negative - positive, positive], dtype=np.int64)
        # The labels file is the mark of pass 2: written last.
        _atomic_save_np({"packed": torch.cat(packed).cpu().numpy(), "counts": counts},
                        self._chunk_path(c, "labels.safetensors"))

    def collect_chunks(self, rank: int, world: int) -> None:
        """Rank 0 receives the chunk files it cannot see (another node's disk), from the rank that wrote them."""
        if world == 1:
            return
        missing = _broadcast_json([c for c in range(len(self.plan.chunks)) if not self._labelled(c)]
                                  if rank == 0 else None, 0)
        with self._disk_errors():
            for c in missing:
                for kind in self._chunk_kinds():
                    path = self._chunk_path(c, kind)
                    _broadcast_file(c % world, path if rank == c % world else None, path if rank == 0 else None)

    # -- assembly (main process) --------------------------------------------------------------------------------------

    def assemble(self) -> None:
        self._assemble_started = time.time()
        with self._disk_errors():
            self._assemble()

    def _assemble(self) -> None:
        missing = [c for c in range(len(self.plan.chunks)) if not self._labelled(c)]
        if missing:
            raise ReferenceStatesError(f"Chunks {missing[:5]} of the build in {self.work} are missing; run it again.")
        h = self.hidden_size
        stats = self.stats
        lengths = np.array(self.replay.lengths, dtype=np.int64)
        token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        label_sizes = np.array([packed_size(int(n), h) for n in lengths], dtype=np.int64)
        label_offsets = np.concatenate([[0], np.cumsum(label_sizes)]).astype(np.int64)
        num_tokens = int(token_offsets[-1])

        # Existing finals are unlinked before anything is written so an interrupted rebuild is never "complete".
        _remove_store_files(self.out_dir)

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
        for i, ids in enumerate(self.replay.input_ids):
            tokens[token_offsets[i] : token_offsets[i + 1]] = np.asarray(ids, dtype=self.token_dtype)
        for c, samples in enumerate(self.plan.chunks):
            chunk_labels = load_np(self._chunk_path(c, "labels.safetensors"))
            packed = chunk_labels["packed"]
            label_counts += chunk_labels["counts"]
            extra_h = np.fromfile(self._chunk_path(c, "hidden"), dtype=np.float16).reshape(-1, h) if hidden is not None else None
            if tlp is not None:
                c_lp = np.fromfile(self._chunk_path(c, "topk_lp"), dtype=np.float32).reshape(-1, self.topk)
                c_id = np.fromfile(self._chunk_path(c, "topk_ids"), dtype=np.int32).reshape(-1, self.topk)
            row = byte = 0
            for i in samples:
                n = int(lengths[i])
                labels[label_offsets[i] : label_offsets[i + 1]] = packed[byte : byte + label_sizes[i]]
                byte += int(label_sizes[i])
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
        _atomic_save_np(stats, os.path.join(self.work, "stats.safetensors"))
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
        self.phase_seconds["assemble"] = round(time.time() - self._assemble_started, 3)
        total_labels = max(int(label_counts.sum()), 1)
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
            "label_fractions": {"negative": float(label_counts[0] / total_labels),
                                "neutral": float(label_counts[1] / total_labels),
                                "positive": float(label_counts[2] / total_labels)},
            # Rank 0's batches forwarded for statistics (pass 1), again for labels (states that did not stay on the
            # device, or a resumed build's), and as padding: what keep_states_bytes and an interruption cost.
            "build": {"seconds": round(seconds, 3), "tokens_per_second": round(num_tokens / max(seconds, 1e-9), 1),
                      "forwards": dict(self.forwards), "seconds_by_phase": dict(self.phase_seconds)},
        }
        _atomic_write_bytes(os.path.join(self.out_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.work, ignore_errors=True)
        logger.info(
            "Reference store %s: %d samples, %d tokens, %.2f MiB on disk (%.2f bits/element; fp32 per-sample files "
            "would need %.1f MiB), %.1f s.",
            self.out_dir, len(lengths), num_tokens, bytes_on_disk / 2**20, manifest["bits_per_element"],
            num_tokens * h * 4 / 2**20, seconds,
        )


def _compute_precision(model) -> str:
    """The precision the model's forward computes in without autocast: FSDP2's mixed-precision policy casts the
    sharded weights to its ``param_dtype`` when it gathers them (accelerate's FSDP2 trains that way, with no
    autocast), else the weights' own dtype."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return model_precision(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            policy = getattr(module._get_fsdp_state(), "_mp_policy", None)  # no public accessor in torch 2.13
            if policy is not None and policy.param_dtype is not None:
                return precision_name(policy.param_dtype)
            break
    return model_precision(model)


def _dir_bytes(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}" if n >= 0.1 * 2**20 else f"{n / 2**20:.3f}"


def _available_host_memory() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else 4 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _read_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _remove_store_files(path: str) -> None:
    """The manifest first, so that a store being replaced is never complete with a mix of old and new files."""
    for name in (MANIFEST,) + STORE_FILES + sum(EXTRA_FILES.values(), ()):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))


@contextlib.contextmanager
def _adapters_disabled(peft_model):
    """PEFT's ``disable_adapter()`` with every parameter's ``requires_grad`` left as it was.

    PEFT turns ``requires_grad`` off on the disabled adapters; FSDP2 initialises its mixed-precision dtypes lazily,
    at the first forward, from the parameters that require gradients then. The build's forward is often that first
    one: FSDP2 would then see no trainable parameter, skip the cast of the reduced gradients back to the adapters'
    float32, and the first backward fails ("assign a gradient with dtype BFloat16 to a tensor with grad_dtype
    Float", seen on an H200 with LoRA, bf16 and gradient checkpointing). The forward runs under no_grad, so the
    flags change nothing in it.
    """
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    with peft_model.disable_adapter():
        for param, flag in flags:
            param.requires_grad_(flag)
        yield


@contextlib.contextmanager
def _without_accelerate_autocast(module):
    """Inside ``train()`` accelerate replaces ``module.forward`` by its mixed-precision autocast wrapper and keeps the
    original as ``_original_forward``. Restoring the original for the build, rather than calling
    ``_original_forward`` itself, lets the build call the module, so that its own hooks run (FSDP2 gathers the
    parameters in forward pre-hooks)."""
    original = module.__dict__.get("_original_forward") if isinstance(module, torch.nn.Module) else None
    if original is None:
        yield
        return
    wrapped = module.__dict__.get("forward")
    module.forward = original
    try:
        yield
    finally:
        if wrapped is not None:
            module.forward = wrapped
        else:
            del module.forward


def padding_forwards_per_rank(plan: _Plan, todo_by_rank: Sequence[Sequence[int]]) -> list[int]:
    """How many empty forwards each rank adds so that every rank runs the same number of forwards.

    Under ZeRO-3 and FSDP every forward of a sharded model gathers parameters collectively, and DDP's forward
    broadcasts buffers: a rank that stopped early would leave the others waiting. Each pass of the build pads this
    way; a rank knows only its own chunks' state (another node's disk may not be visible), so the counts are
    exchanged first. One process needs none.
    """
    counts = [sum(len(plan.batches(c)) for c in chunks) for chunks in todo_by_rank]
    if len(counts) <= 1:
        return [0] * len(counts)
    return [max(counts) - n for n in counts]


def _padding_to_max(forwards: int) -> int:
    """This rank's share of :func:`padding_forwards_per_rank`, from every rank's count of forwards (collective)."""
    counts = _all_gather_json(int(forwards))
    return max(counts) - int(forwards)


# ----------------------------------------------------------------------------------------------------------------------
# Several processes, several nodes: what the ranks exchange over torch.distributed
# ----------------------------------------------------------------------------------------------------------------------
#
# No filesystem needs to be shared. Each rank writes its chunks where it sees ``out_dir``; the statistics are
# all-gathered; rank 0 receives the chunk files it cannot see and assembles the store; every other directory that
# does not show rank 0's files gets them, written by the lowest rank that sees that directory. Where a filesystem is
# shared nothing is sent. The same calls run on gloo (CPU) and NCCL (GPU tensors).

_PROBE_PREFIX = ".gere-probe-"
_FILE_PIECE_BYTES = 64 << 20  # a file travels in pieces of this size: bounded memory on both sides


def _comm_device() -> torch.device:
    """Where tensors for the default process group live: the CPU under gloo (also accelerate's 'cuda:nccl,cpu:gloo'),
    the current GPU under NCCL."""
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable ``obj``, in rank order (collective)."""
    rank, world = _dist_info()
    if world == 1:
        return [obj]
    device = _comm_device()
    data = json.dumps(obj).encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(bufs, buf)
    return [json.loads(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, sizes)]


def _broadcast_json(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (collective); in one process, ``obj``."""
    rank, world = _dist_info()
    if world == 1:
        return obj
    device = _comm_device()
    data = json.dumps(obj).encode() if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank == src:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    torch.distributed.broadcast(buf, src)
    return json.loads(buf.cpu().numpy().tobytes())


def _broadcast_file(src: int, src_path: str | None, dst_path: str | None, blake2b: str | None = None) -> None:
    """Send the file ``src_path`` of rank ``src`` to every rank; those given a ``dst_path`` write it there atomically,
    checked against ``blake2b`` when given (collective)."""
    rank, _ = _dist_info()
    device = _comm_device()
    size = torch.tensor([os.path.getsize(src_path) if rank == src else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src)
    size = int(size.item())
    reader = open(src_path, "rb") if rank == src else contextlib.nullcontext()
    tmp = f"{dst_path}.tmp" if dst_path is not None else None
    writer = open(tmp, "wb") if dst_path is not None else contextlib.nullcontext()
    digest = hashlib.blake2b(digest_size=16)
    try:
        with reader as f_in, writer as f_out:
            done = 0
            while done < size:
                n = min(_FILE_PIECE_BYTES, size - done)
                if rank == src:
                    piece = torch.frombuffer(bytearray(f_in.read(n)), dtype=torch.uint8).to(device)
                else:
                    piece = torch.empty(n, dtype=torch.uint8, device=device)
                torch.distributed.broadcast(piece, src)
                if f_out is not None:
                    data = piece.cpu().numpy().tobytes()
                    f_out.write(data)
                    digest.update(data)
                done += n
            if f_out is not None:
                f_out.flush()
                os.fsync(f_out.fileno())
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    if dst_path is None:
        return
    if blake2b is not None and digest.hexdigest() != blake2b:
        os.remove(tmp)
        raise ReferenceStatesError(f"{dst_path} arrived corrupted from rank {src} (checksum mismatch). Run again.")
    os.replace(tmp, dst_path)


def _agree(fn) -> None:
    """Run ``fn`` on every rank; a :class:`ReferenceStatesError` on any rank is raised on all of them, so that no
    rank goes on to a collective the others never reach (collective)."""
    error = None
    try:
        fn()
    except ReferenceStatesError as e:
        error = e
    messages = _all_gather_json(None if error is None else str(error))
    if error is not None:
        raise error
    for r, message in enumerate(messages):
        if message is not None:
            raise ReferenceStatesError(f"Rank {r} stopped the reference store: {message}")


def _directory_leaders(directory: str) -> list[int]:
    """For every rank, the lowest rank that sees the same ``directory`` (the same path on the same filesystem).

    Found by probing, not assumed from host names: the lowest rank not yet placed writes a probe file into its
    ``directory``, every unplaced rank that finds it in its own is placed with it, and so on (collective; one round
    per distinct directory). With a shared filesystem every rank is placed with rank 0 in one round.
    """
    rank, world = _dist_info()
    if world == 1:
        return [0]
    token = _broadcast_json(secrets.token_hex(8) if rank == 0 else None, 0)
    leaders = [-1] * world
    while -1 in leaders:
        leader = leaders.index(-1)
        name = f"{_PROBE_PREFIX}{token}-{leader}"
        if rank == leader:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, name), "wb"):
                pass
        _barrier()
        # Listing the directory (not a bare stat) makes network filesystems revalidate their cached entries.
        sees = leaders[rank] == -1 and os.path.isdir(directory) and name in os.listdir(directory)
        for r, seen in enumerate(_all_gather_json(sees)):
            if seen or r == leader:
                leaders[r] = leader
        if rank == leader:
            os.remove(os.path.join(directory, name))
    return leaders


def _sync_store(path: str, manifest: dict) -> None:
    """Give every directory that does not hold rank 0's store (``manifest``) a copy of it (collective)."""
    rank, _ = _dist_info()
    local = _read_manifest(path)
    same = local is not None and local.get("files") == manifest["files"]
    everywhere = _all_gather_json(same)
    if all(everywhere):
        return
    leaders = _directory_leaders(path)
    receivers = sorted({leaders[r] for r, has in enumerate(everywhere) if not has} - {0})
    _send_store(path, manifest, receivers)


def _send_store(path: str, manifest: dict, receivers: Sequence[int]) -> None:
    """Rank 0's store files, the manifest last, written into ``path`` by the ``receivers`` (collective)."""
    rank, _ = _dist_info()
    if not receivers:
        return
    receiving = rank in receivers
    if receiving:
        logger.info("Reference store: writing rank 0's store into %s (this node does not see rank 0's files).", path)
        os.makedirs(path, exist_ok=True)
        _remove_store_files(path)
    for name, info in manifest["files"].items():
        _broadcast_file(0, os.path.join(path, name) if rank == 0 else None,
                        os.path.join(path, name) if receiving else None, info["blake2b"])
    _broadcast_file(0, os.path.join(path, MANIFEST) if rank == 0 else None,
                    os.path.join(path, MANIFEST) if receiving else None)
    _barrier()
