"""Files written whole or not at all, and file hashes: the one place gere_hf writes JSON, JSONL and small files.

Every writer writes a temporary file beside the target (``<path>.tmp``, or a private name with ``unique=True`` where
several processes may write the same file) and renames it onto the target, so an interrupted write never leaves half
a file; a failed write removes its temporary file (a full disk needs the space back). This module imports nothing of
gere_hf: any module may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from typing import Any

_READ_BLOCK = 1 << 22


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, unique: bool = False):
    """``open(path, mode)`` for writing, atomically: what is written goes to a temporary file, renamed onto ``path``
    when the block ends without an error (removed when it raises). ``fsync``: the bytes are on disk before the
    rename. ``unique``: a private temporary name (mode 0644), for files several processes may write at once."""
    binary = "b" in mode
    encoding = None if binary else "utf-8"
    if unique:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp",
                                   dir=os.path.dirname(path) or ".")
        os.fchmod(fd, 0o644)
        f = os.fdopen(fd, mode, encoding=encoding)
    else:
        tmp = f"{path}.tmp"
        f = open(tmp, mode, encoding=encoding)
    try:
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a partial file would only take space a full disk needs back
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; by default the bytes are on disk before the rename."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str, text: str, *, unique: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", unique=unique) as f:
        f.write(text)


def json_default(value: Any):
    """What JSON cannot hold as it is: numpy and torch scalars as numbers, anything else as its string."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def write_json(path: str, data: Any) -> None:
    """Write JSON (indented) atomically: an interrupted write never leaves half a file."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, default=json_default)


def write_jsonl(path: str, rows: Iterable[Any]) -> None:
    """Write one JSON object a line, atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    return _file_hash(path, hashlib.sha256())


def file_blake2b(path: str) -> str:
    """The 16-byte BLAKE2b of a file's bytes (hex): the reference store's checksums."""
    return _file_hash(path, hashlib.blake2b(digest_size=16))


def _file_hash(path: str, h) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "file_blake2b", "file_sha256", "json_default", "read_json",
           "write_json", "write_jsonl"]
