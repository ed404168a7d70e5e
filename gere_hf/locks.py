"""Exclusive file locks on folders that one process at a time may write: a run folder, a reference store.

A lock is the file ``<folder>/.gere.lock``, locked with ``flock`` and holding its holder (pid, host, what it does,
since when), so that whoever finds it taken can be told who holds it. The kernel releases the lock when its process
ends, however it ends (SIGKILL included): a lock file whose holder is gone is stale and simply taken over. The file is
removed on release; a process that locked a file which was removed meanwhile (its holder released it between our
``open`` and our ``flock``) locks again, so that two processes never both hold a lock on two different files.

Two ways to meet a held lock:

* ``wait=True`` (a store being built by another process): wait until it is released, saying who builds it, then go
  on (the caller then finds the store complete and uses it);
* ``wait=False`` (a run folder in use): :class:`FolderLockedError` naming the holder and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

LOCK_FILE = ".gere.lock"


class FolderLockedError(RuntimeError):
    """The folder is locked by another process; the message names the holder."""


class NotAFolderError(ValueError):
    """The path to lock is a file."""


def holder_description(holder: dict | None) -> str:
    """``pid 123 on host h (gere-hf run, since 2026-01-01T10:00:00)``, or a placeholder for an unreadable holder."""
    if not holder:
        return "another process (its lock file names no holder yet)"
    what = f"{holder.get('what')}, " if holder.get("what") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({what}since {holder.get('since')})"


def read_holder(folder: str) -> dict | None:
    """The holder written in ``folder``'s lock file, or None (no lock file, or one being written)."""
    try:
        with open(os.path.join(folder, LOCK_FILE), encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def holder_alive(holder: dict) -> bool | None:
    """Whether the holder's process runs: True/False on this host, None for another host (it cannot be told)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _this_holder(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv[:3])}


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it was not released and removed meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def folder_lock(folder: str, what: str, *, wait: bool, remove_if_empty: bool = False, poll_seconds: float = 0.5,
                report_every: float = 60.0) -> Iterator[dict]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block; yields this holder.

    Args:
        folder: the folder to lock.
        what: what the holder does (``gere-hf run``, ``reference store build``), written for others to read.
        wait: wait for a held lock (logging who holds it every ``report_every`` seconds), or raise
            :class:`FolderLockedError` at once.
        remove_if_empty: remove ``folder`` on release if this lock created it and it is empty (a run refused
            before it wrote anything leaves no folder behind).
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotAFolderError(f"{folder} is a file, not a folder. Give the path of a folder (it is created if "
                              "missing).")
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    holder = _this_holder(what)
    started, last_report = time.time(), 0.0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = _try_lock(fd)
        except OSError:
            os.close(fd)
            raise
        if locked and _same_file(fd, path):
            break
        os.close(fd)
        if locked:  # the file we locked was released and removed meanwhile: lock the new one
            continue
        other = read_holder(folder)
        if not wait:
            alive = holder_alive(other) if other else None
            note = " (its process has ended; a child process of it still holds the lock)" if alive is False else ""
            raise FolderLockedError(
                f"{folder} is in use by {holder_description(other)}{note}. Wait until it ends, stop it, or choose "
                "another folder."
            )
        now = time.time()
        if now - last_report >= report_every:
            logger.info("Waiting for %s, which %s holds (%s); waited %.0f s so far.", folder,
                        holder_description(other), other.get("what") if other else "unknown", now - started)
            last_report = now
        time.sleep(poll_seconds)
    previous = read_holder(folder)
    if previous and previous.get("pid") != holder["pid"]:
        logger.info("Taking over the lock of %s left by %s: that process has ended.", folder,
                    holder_description(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    try:
        yield holder
    finally:
        # Remove while still locked: a waiter that opened the old file sees it gone and locks the next one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        if created and remove_if_empty:
            with contextlib.suppress(OSError):  # not empty: the holder wrote into it
                os.rmdir(folder)


__all__ = ["LOCK_FILE", "FolderLockedError", "NotAFolderError", "folder_lock", "holder_alive", "holder_description",
           "read_holder"]
