"""File locks (gere_hf.locks) with real processes: a folder in use is refused naming its holder, a waiter goes on
when the holder releases, a lock left by a killed process is taken over, and two processes building one reference
store build it once (the second waits, then opens what the first built)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gere_hf.locks import LOCK_FILE, FolderLockedError, NotAFolderError, folder_lock, read_holder

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "workers", "lock_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def _wait_for(predicate, timeout=120.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker ended early: {proc.communicate()[0]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def _holder(tmp_path, folder):
    """A real process holding ``folder``'s lock; returns (process, release file)."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, WORKER, "hold", str(folder), str(ready), str(release)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(ready.exists, proc=proc)
    return proc, release


def test_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    proc, release = _holder(tmp_path, folder)
    try:
        with pytest.raises(FolderLockedError) as info, folder_lock(str(folder), "test", wait=False):
            pass
        message = str(info.value)
        assert f"{folder} is in use by pid {proc.pid} on host {socket.gethostname()} (lock_worker hold, since" in message
        assert "Wait until it ends, stop it, or choose another folder." in message
    finally:
        release.touch()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert not (folder / LOCK_FILE).exists()  # released and removed
    with folder_lock(str(folder), "test", wait=False) as holder:  # free again
        assert read_holder(str(folder)) == holder and holder["pid"] == os.getpid()


def test_a_waiter_goes_on_once_the_holder_releases(tmp_path):
    folder = tmp_path / "store"
    proc, release = _holder(tmp_path, folder)
    released_at = []

    def release_soon():
        time.sleep(1.0)
        released_at.append(time.time())
        release.touch()

    import threading

    threading.Thread(target=release_soon, daemon=True).start()
    with folder_lock(str(folder), "test", wait=True, poll_seconds=0.05):
        acquired = time.time()
        assert read_holder(str(folder))["pid"] == os.getpid()
    proc.wait(timeout=60)
    assert released_at and acquired >= released_at[0]


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    """SIGKILL leaves the lock file with the dead holder in it; the kernel released the lock itself."""
    folder = tmp_path / "run"
    proc, _ = _holder(tmp_path, folder)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert read_holder(str(folder))["pid"] == proc.pid  # the stale lock file
    with caplog.at_level(logging.INFO, logger="gere_hf.locks"), folder_lock(str(folder), "test", wait=False):
        assert read_holder(str(folder))["pid"] == os.getpid()
    assert f"Taking over the lock of {folder} left by pid {proc.pid} on host" in caplog.text
    assert "that process has ended" in caplog.text


def test_a_file_is_not_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotAFolderError, match=r"is a file, not a folder\. Give the path of a folder"), \
            folder_lock(str(path), "test", wait=False):
        pass
    assert path.read_text() == "x"


def test_a_refused_holder_leaves_no_new_folder_behind(tmp_path):
    folder = tmp_path / "new_run"
    with folder_lock(str(folder), "test", wait=False, remove_if_empty=True):
        assert folder.is_dir()
    assert not folder.exists()
    with folder_lock(str(folder), "test", wait=False, remove_if_empty=True):
        (folder / "written.txt").write_text("x")
    assert (folder / "written.txt").exists() and not (folder / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_processes_building_one_store_build_it_once(tmp_path):
    """The first process holds its first forward until the second is about to build the same store; the second waits
    for the first's build and opens the finished store without a forward of its own. Without the lock both built into
    the same folder at once."""
    store = tmp_path / "store"
    results = [tmp_path / "a.json", tmp_path / "b.json"]
    first = subprocess.Popen([sys.executable, WORKER, "build", str(store), str(results[0]), f"{results[1]}.started"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (store / ".building").is_dir(), proc=first)
    second = subprocess.Popen([sys.executable, WORKER, "build", str(store), str(results[1])], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    a, b = (json.loads(r.read_text()) for r in results)
    assert a["forwards"] > 0 and b["forwards"] == 0, (a["forwards"], b["forwards"])
    assert a["manifest"]["files"] == b["manifest"]["files"]
    assert b["ended"] >= a["ended"] - 1.0
    assert sorted(os.listdir(store)) == sorted([*a["manifest"]["files"], "manifest.json"])
