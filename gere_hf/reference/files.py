"""Small file helpers of the store: its manifest, its files removed in a safe order, disk space and memory."""

from __future__ import annotations

import contextlib
import errno
import json
import os

from ..locks import LOCK_FILE
from .format import BUILDING, EXTRA_FILES, MANIFEST, PROBE_PREFIX, STORE_FILES, is_store


def read_manifest(path: str) -> dict | None:
    """The manifest of the store at ``path``, or None when there is none (or it cannot be read: not a store)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def foreign_files(path: str) -> list[str]:
    """What a store folder holds besides a store or an unfinished build (its lock and the ranks' probes aside), sorted:
    a build refuses to write among other files."""
    if not os.path.isdir(path) or is_store(path) or os.path.isdir(os.path.join(path, BUILDING)):
        return []
    return sorted(n for n in os.listdir(path) if not n.startswith(PROBE_PREFIX) and n != LOCK_FILE)


def remove_store_files(path: str) -> None:
    """The manifest first, so that a store being replaced is never complete with a mix of old and new files."""
    for name in (MANIFEST,) + STORE_FILES + sum(EXTRA_FILES.values(), ()):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))


def preallocate(f, size: int) -> None:
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


def dir_bytes(path: str) -> int:
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}" if n >= 0.1 * 2**20 else f"{n / 2**20:.3f}"


def available_host_memory() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else 4 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
