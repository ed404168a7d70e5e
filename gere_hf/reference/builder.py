"""The builder: the base model's final hidden states on the replay texts, recorded as a store.

Pass 1 forwards every chunk of samples (float64 statistics per hidden dimension, the extras; the states kept on the
device while they fit), the thresholds ``mean ± k·std`` come from all chunks' statistics, pass 2 labels and packs each
chunk (from its kept states, or from a second forward), and the main process assembles the final files from the
chunks. A build is resumable and atomic: chunks are written to ``.building/`` under temporary names and renamed when
complete; ``manifest.json`` is written last. Under ``torch.distributed`` every rank forwards its share of the chunks
and the ranks exchange what they cannot see on disk (:mod:`.exchange`); one build of a store runs at a time
(:func:`gere_hf.locks.folder_lock`).
"""

from __future__ import annotations

import contextlib
import errno
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

from ..distributed import barrier, dist_info
from ..fileio import atomic_write_bytes, file_blake2b
from ..locks import folder_lock
from ..losses import threshold_labels
from ..models import find_final_norm, is_peft_model, unwrap_causal_lm, virtual_token_count
from ..replay import ReplaySet
from .errors import ReferenceStoreError
from .exchange import (
    all_gather_json,
    broadcast_file,
    broadcast_json,
    comm_device,
    directory_leaders,
    fail_together,
    send_store,
)
from .files import (
    available_host_memory,
    dir_bytes,
    foreign_files,
    mib,
    preallocate,
    read_manifest,
    remove_store_files,
)
from .fingerprint import as_dtype, compute_fingerprint, model_precision, precision_name, short_sha
from .format import (
    BUILDING,
    EXTRA_FILES,
    FORMAT_VERSION,
    KNOWN_EXTRAS,
    MANIFEST,
    STORE_FILES,
    is_store,
    pack_codes,
    packed_size,
    token_dtype_for,
)

logger = logging.getLogger(__name__)


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Arrays written as one safetensors file, atomically. Serialised in memory and written by Python: a full disk is
    an OSError(ENOSPC), not a SafetensorError."""
    atomic_write_bytes(path, save_np_bytes(tensors))


@dataclass(frozen=True)
class ChunkPlan:
    """Samples in length-sorted chunks, each chunk split into forward batches; a pure function of lengths."""

    chunks: tuple[tuple[int, ...], ...]
    batch_size: int

    @classmethod
    def make(cls, lengths: Sequence[int], batch_size: int, chunk_size: int) -> ChunkPlan:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        chunks = tuple(tuple(order[s : s + chunk_size]) for s in range(0, len(order), chunk_size))
        return cls(chunks, batch_size)

    def batches(self, chunk: int) -> list[tuple[int, ...]]:
        samples = self.chunks[chunk]
        return [samples[s : s + self.batch_size] for s in range(0, len(samples), self.batch_size)]

    def digest(self) -> str:
        return short_sha(json.dumps([self.chunks, self.batch_size]).encode())


def build_store(
    store_cls,
    model,
    replay: ReplaySet,
    out_dir: str,
    *,
    k: float,
    batch_size: int,
    chunk_size: int,
    dtype: torch.dtype | str | None,
    extras: Sequence[str],
    topk: int,
    topk_temperature: float,
    reference: str,
    rebuild: bool,
    forward_model,
    keep_states_bytes: int | None,
    open_fields: Sequence[str],
    progress: bool,
):
    """The work of :meth:`ReferenceStore.build` (``store_cls``: the class whose ``open`` and ``open_distributed``
    read the result): the checks, the build lock, one :class:`StoreBuilder` per rank, the exchange of chunks and of
    the finished store between nodes."""
    out_dir = os.fspath(out_dir)
    extras = tuple(dict.fromkeys(extras))
    validate_build_args(k, batch_size, chunk_size, extras, topk, reference, len(replay))
    if keep_states_bytes is not None and keep_states_bytes < 0:
        raise ReferenceStoreError(f"keep_states_bytes must be ≥ 0 (or None), got {keep_states_bytes}.")
    find_final_norm(model)  # a clear error before any work
    dtype = as_dtype(dtype)
    fingerprint = compute_fingerprint(model, replay, k, precision=dtype)
    rank, world = dist_info()
    fail_together(lambda: check_build_dir(out_dir))
    # One build of a store at a time: another launch sharing store_dir waits here until this one's build ends,
    # then opens what it built. Rank 0 holds the lock for its launch (its ranks build together).
    with folder_lock(out_dir, "reference store build", wait=True) if rank == 0 else contextlib.nullcontext():
        # Rank 0's directory decides whether there is a store to open: a node-local directory elsewhere may be
        # empty.
        exists = broadcast_json(is_store(out_dir), 0)
        if exists and not rebuild:
            store = store_cls.open_distributed(out_dir, fingerprint, fields=open_fields)
            store.require_extras(extras, topk if "topk" in extras else None,
                                 topk_temperature if "topk" in extras else None)
            return store
        builder = StoreBuilder(model, forward_model or model, replay, out_dir, fingerprint, k, batch_size,
                               chunk_size, dtype, extras, topk, topk_temperature, reference, keep_states_bytes,
                               progress and rank == 0)
        leaders = directory_leaders(out_dir)
        fail_together(lambda: builder.prepare() if leaders[rank] == rank else None)  # one rank per directory
        barrier()
        builder.run(rank, world)
        builder.collect_chunks(rank, world)
        if rank == 0:
            builder.assemble()
        barrier()
        if world > 1:
            manifest = broadcast_json(read_manifest(out_dir) if rank == 0 else None, 0)
            send_store(out_dir, manifest, receivers=sorted({r for r in leaders if r != 0}))
            if leaders[rank] == rank and rank != 0:
                shutil.rmtree(builder.work, ignore_errors=True)
            barrier()
        return store_cls.open(out_dir, fingerprint, verify=False)


def validate_build_args(k, batch_size, chunk_size, extras, topk, reference, num_samples) -> None:
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ReferenceStoreError(f"k (the threshold width in standard deviations) must be > 0, got {k!r}.")
    if batch_size < 1 or chunk_size < 1:
        raise ReferenceStoreError(f"batch_size and chunk_size must be ≥ 1, got {batch_size} and {chunk_size}.")
    unknown = [e for e in extras if e not in KNOWN_EXTRAS]
    if unknown:
        raise ReferenceStoreError(f"Unknown extras {unknown}; choose from {list(KNOWN_EXTRAS)}.")
    if "topk" in extras and topk < 1:
        raise ReferenceStoreError(f"topk must be ≥ 1 when storing teacher log-probs, got {topk}.")
    if reference not in ("base", "current"):
        raise ReferenceStoreError(f"reference must be 'base' or 'current', got {reference!r}.")
    if num_samples == 0:
        raise ReferenceStoreError("The replay set is empty; there is nothing to record.")


def check_build_dir(out_dir: str) -> None:
    """Refuse a directory that holds anything but a store or an unfinished build (its files are left alone)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReferenceStoreError(f"The store directory {out_dir} is a file. Give a directory's path (store_dir).")
    names = foreign_files(out_dir)
    if names:
        raise ReferenceStoreError(
            f"The output directory {out_dir} holds something other than a reference store "
            f"({', '.join(names[:5])}). Give an empty or new directory."
        )


# What .building holds: 1 = fp32 states per chunk, labelled at assembly (before the device-resident build);
# 2 = per chunk the float64 statistics, the extras and the packed labels. Part of plan.json: a layout-1 build left
# over is started afresh.
_BUILD_LAYOUT = 2
_LABEL_PIECE_ELEMENTS = 1 << 24  # labelled at a time: bounds the device's float32 temporaries to 64 MiB


class StoreBuilder:
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
        self.plan = ChunkPlan.make(replay.lengths, batch_size, chunk_size)
        # A prompt-learning PEFT model recorded with its adapter (reference "current") prepends virtual tokens: the
        # store holds the text's positions only, as the trainer compares them.
        self.skip = virtual_token_count(model) if reference == "current" else 0
        self.started = time.time()
        self.kept: dict[int, torch.Tensor] = {}  # chunk -> its states [tokens, H] on the device, in the forward's dtype
        self.chunk_stats: dict[int, dict[str, np.ndarray]] = {}
        self.stats: dict[str, np.ndarray] | None = None  # the store's statistics and thresholds, once known
        self.forwards = {"statistics": 0, "labels": 0, "padding": 0}  # batches forwarded by this rank, per purpose
        # Rank 0's wall seconds per phase: where a build's time goes beyond its forwards (docs/lab/benchmarks.md).
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
        need = self.needed_bytes() - dir_bytes(self.work)
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise ReferenceStoreError(
                f"Not enough disk space for the reference store in {self.out_dir}: the build needs about "
                f"{mib(need)} MiB more, {mib(free)} MiB are free. Free space or choose another store_dir."
            )

    def disk_full(self) -> ReferenceStoreError:
        return ReferenceStoreError(
            f"The disk filled up while building the reference store in {self.out_dir}. The build needs about "
            f"{mib(self.needed_bytes())} MiB in all; the finished chunks are kept in {self.work}. "
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
        atomic_write_bytes(plan_path, json.dumps(plan, sort_keys=True).encode())

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
                padding = padding_to_max(sum(len(self.plan.batches(c)) for c in to_record))
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
                padding = padding_to_max(sum(len(self.plan.batches(c)) for c in again))
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
        return available_host_memory() // 4

    def _reference_context(self):
        stack = contextlib.ExitStack()
        if self.reference == "base" and is_peft_model(self.model):
            peft_model = self.model if hasattr(self.model, "disable_adapter") else self.model.module
            stack.enter_context(adapters_disabled(peft_model))
        device = self._device()
        if self.dtype is not None and precision_name(self.dtype) != compute_precision(self.model):
            stack.enter_context(torch.autocast(device.type, dtype=self.dtype))
        else:
            # The weights' own precision: an ambient autocast (the caller's) must not change what is recorded.
            stack.enter_context(torch.autocast(device.type, enabled=False))
        for module in dict.fromkeys([self.forward_model, self.model]):
            stack.enter_context(without_accelerate_autocast(module))
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
            atomic_write_bytes(self._chunk_path(c, "hidden"), torch.cat(hiddens).cpu().numpy().tobytes())
        if tlps:
            atomic_write_bytes(self._chunk_path(c, "topk_lp"), torch.cat(tlps).cpu().numpy().tobytes())
            atomic_write_bytes(self._chunk_path(c, "topk_ids"), torch.cat(tids).cpu().numpy().tobytes())
        stats = {"sum": total.cpu().numpy(), "sumsq": total_sq.cpu().numpy(), "count": np.array([count], dtype=np.int64)}
        # The stats file is the mark of pass 1: written last.
        save_safetensors(stats, self._chunk_path(c, "stats.safetensors"))
        self.chunk_stats[c] = stats

    def _reduce_statistics(self, mine: Sequence[int], world: int) -> dict[str, np.ndarray]:
        """Every chunk's sums, added in chunk order on every rank: the same thresholds, whatever the world size."""
        h, n = self.hidden_size, len(self.plan.chunks)
        rows = np.zeros((n, 2 * h + 1), dtype=np.float64)
        for c in mine:
            s = self.chunk_stats.get(c) or load_np(self._chunk_path(c, "stats.safetensors"))
            rows[c] = np.concatenate([s["sum"], s["sumsq"], s["count"].astype(np.float64)])
        if world > 1:  # each chunk's row from the rank that recorded it (no filesystem needs to be shared)
            mine_rows = torch.from_numpy(rows).to(comm_device())
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
            packed.append(pack_codes(labels))
        del states
        elements = self._tokens(c) * h
        negative, positive = int(negative), int(positive)
        counts = np.array([negative, elements - negative - positive, positive], dtype=np.int64)
        # The labels file is the mark of pass 2: written last.
        save_safetensors({"packed": torch.cat(packed).cpu().numpy(), "counts": counts},
                        self._chunk_path(c, "labels.safetensors"))

    def collect_chunks(self, rank: int, world: int) -> None:
        """Rank 0 receives the chunk files it cannot see (another node's disk), from the rank that wrote them."""
        if world == 1:
            return
        missing = broadcast_json([c for c in range(len(self.plan.chunks)) if not self._labelled(c)]
                                  if rank == 0 else None, 0)
        with self._disk_errors():
            for c in missing:
                for kind in self._chunk_kinds():
                    path = self._chunk_path(c, kind)
                    broadcast_file(c % world, path if rank == c % world else None, path if rank == 0 else None)

    # -- assembly (main process) --------------------------------------------------------------------------------------

    def assemble(self) -> None:
        self._assemble_started = time.time()
        with self._disk_errors():
            self._assemble()

    def _assemble(self) -> None:
        missing = [c for c in range(len(self.plan.chunks)) if not self._labelled(c)]
        if missing:
            raise ReferenceStoreError(f"Chunks {missing[:5]} of the build in {self.work} are missing; run it again.")
        h = self.hidden_size
        stats = self.stats
        lengths = np.array(self.replay.lengths, dtype=np.int64)
        token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        label_sizes = np.array([packed_size(int(n), h) for n in lengths], dtype=np.int64)
        label_offsets = np.concatenate([[0], np.cumsum(label_sizes)]).astype(np.int64)
        num_tokens = int(token_offsets[-1])

        # Existing finals are unlinked before anything is written so an interrupted rebuild is never "complete".
        remove_store_files(self.out_dir)

        def final_map(name, dtype, numel):
            path = os.path.join(self.work, name)
            with open(path, "wb") as f:
                preallocate(f, numel * np.dtype(dtype).itemsize)
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
        save_safetensors(stats, os.path.join(self.work, "stats.safetensors"))
        save_safetensors({"lengths": lengths, "token_offsets": token_offsets, "label_offsets": label_offsets},
                        os.path.join(self.work, "index.safetensors"))
        names = list(STORE_FILES) + [n for e in self.extras for n in EXTRA_FILES[e]]
        files = {}
        for name in names:
            src = os.path.join(self.work, name)
            files[name] = {"bytes": os.path.getsize(src), "blake2b": file_blake2b(src)}
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
        atomic_write_bytes(os.path.join(self.out_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.work, ignore_errors=True)
        logger.info(
            "Reference store %s: %d samples, %d tokens, %.2f MiB on disk (%.2f bits/element; fp32 per-sample files "
            "would need %.1f MiB), %.1f s.",
            self.out_dir, len(lengths), num_tokens, bytes_on_disk / 2**20, manifest["bits_per_element"],
            num_tokens * h * 4 / 2**20, seconds,
        )



def compute_precision(model) -> str:
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


@contextlib.contextmanager
def adapters_disabled(peft_model):
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
def without_accelerate_autocast(module):
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


def padding_forwards_per_rank(plan: ChunkPlan, todo_by_rank: Sequence[Sequence[int]]) -> list[int]:
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


def padding_to_max(forwards: int) -> int:
    """This rank's share of :func:`padding_forwards_per_rank`, from every rank's count of forwards (collective)."""
    counts = all_gather_json(int(forwards))
    return max(counts) - int(forwards)
