"""Fingerprints of the files a run depends on, so that a changed file is noticed instead of silently used: the base
model's weights, each finished stage's adapter or weights, the sources the data builders read.

A file's record is its size, its modification time (ns) and its SHA-256. Checking a file against its record is quick
when size and time are those recorded (nothing rewrote it) and hashes it otherwise: a copy, a truncation, a file from
another run all change the hash, while a folder copied with its times kept (``rsync -a``) is not hashed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from ..fileio import file_sha256

# What a model folder holds that decides its weights (its config included: the same tensors under another config are
# another model).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json")
# Trainer files saved beside the weights that say nothing about them (training_args.bin is a pickle of arguments).
NOT_WEIGHTS = ("training_args.bin",)


def file_record(path: str) -> dict:
    """``{"bytes", "mtime_ns", "sha256"}`` of a file."""
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def record_differs(path: str, record: dict) -> str | None:
    """None when ``path`` holds what ``record`` describes; else what differs, in words."""
    if not os.path.isfile(path):
        return "it is missing"
    stat = os.stat(path)
    if stat.st_size != record.get("bytes"):
        return f"it has {stat.st_size} bytes, the run recorded {record.get('bytes')}"
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return None
    digest = file_sha256(path)
    if digest != record.get("sha256"):
        return f"its SHA-256 is {digest[:16]}…, the run recorded {str(record.get('sha256'))[:16]}…"
    return None


def model_files(folder: str) -> list[str]:
    """The files of a model or adapter folder that decide its weights (names relative to the folder, sorted)."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel.split(os.sep)[0] == "checkpoints" or name in NOT_WEIGHTS:
                continue
            if name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_FILES:
                out.append(rel)
    return sorted(out)


def folder_records(folder: str, names: Iterable[str] | None = None) -> dict[str, dict]:
    """``{name: file_record}`` of ``names`` in ``folder`` (default: :func:`model_files`)."""
    names = model_files(folder) if names is None else names
    return {name: file_record(os.path.join(folder, name)) for name in names}


def records_digest(records: dict[str, dict]) -> str:
    """One hash of a folder's records (the names and their SHA-256), to show in messages."""
    h = hashlib.sha256()
    for name in sorted(records):
        h.update(f"{name}\t{records[name]['sha256']}\n".encode())
    return h.hexdigest()[:16]


def folder_differences(folder: str, records: dict[str, dict]) -> list[str]:
    """``["name: what differs", ...]`` for the recorded files of ``folder`` that changed, and weight files added."""
    out = [f"{name}: {why}" for name, record in sorted(records.items())
           if (why := record_differs(os.path.join(folder, name), record)) is not None]
    out += [f"{name}: not there when the run recorded the folder" for name in model_files(folder)
            if name not in records]
    return out


def changed_digest(folder: str, records: dict[str, dict]) -> str:
    """The digest the folder's files would have now (for a message beside the recorded one)."""
    names = sorted(set(records) | set(model_files(folder)))
    current = {n: {"sha256": file_sha256(os.path.join(folder, n)) if os.path.isfile(os.path.join(folder, n))
                   else "missing"} for n in names}
    return records_digest(current)


# Sources up to this size are hashed whole; larger ones (a local SlimPajama) by size, time and their ends.
FULL_HASH_BYTES = 1 << 30
_END_BYTES = 1 << 20


def _ends_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_END_BYTES))
        f.seek(max(os.path.getsize(path) - _END_BYTES, 0))
        h.update(f.read(_END_BYTES))
    return h.hexdigest()


def sources_fingerprint(paths: Iterable[str]) -> str:
    """One SHA-256 over data files (in the given order): the same files give the same value wherever they lie and
    whatever they are called. Up to :data:`FULL_HASH_BYTES` in all their contents are hashed (any changed byte gives
    another value); beyond, each file's size, modification time and first and last MiB (a rewritten file changes)."""
    paths = list(paths)
    whole = sum(os.path.getsize(p) for p in paths) <= FULL_HASH_BYTES
    h = hashlib.sha256()
    for path in paths:
        if whole:
            h.update(file_sha256(path).encode())
        else:
            stat = os.stat(path)
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}:{_ends_sha256(path)}".encode())
    return h.hexdigest()


__all__ = ["changed_digest", "file_record", "folder_differences", "folder_records", "model_files",
           "record_differs", "records_digest", "sources_fingerprint"]
