"""`gere-hf` in a process that SIGKILLs itself at a chosen file: for the kill-point tests of
tests/continual/test_reliability_recipe.py.

Usage: kill_worker.py ROOT TARGET WHEN gere-hf-args...

ROOT is the run's output_dir and TARGET a path under it. The process watches its own file operations (Python audit
events: open for writing, rename/replace, mkdir, remove, rmtree) and kills itself with SIGKILL:

* WHEN ``before``: at the first operation that starts writing TARGET (opening it or its ``.tmp`` for writing, renaming
  a file onto it, creating it as a folder) or removing it: TARGET is absent, partial or about to change;
* WHEN ``after``: at the first file operation of any kind once this process has written TARGET (or, if TARGET was
  not there when it started, once TARGET exists: files written outside Python, such as safetensors, raise no audit
  event): it was written to the end (nothing writes between two file operations of one thread), and nothing after it
  was.

Exits 0 without being killed if TARGET is never reached: the test then says its kill point was not reached.
"""

import os
import signal
import sys


def _writing(event: str, args: tuple) -> str | None:
    """The path an audit event starts to change, or None."""
    if event == "open" and len(args) >= 3 and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] or 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return os.fsdecode(args[0]) if writes else None
    if event == "os.rename" and len(args) >= 2:
        return os.fsdecode(args[1])
    if event in ("os.mkdir", "os.remove", "shutil.rmtree") and args and isinstance(args[0], (str, bytes)):
        return os.fsdecode(args[0])
    return None


_FILE_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "shutil.rmtree", "os.listdir", "os.scandir"}


def install(target: str, when: str) -> None:
    target = os.path.abspath(target)
    busy, written = [], [not os.path.exists(target)]

    def hook(event, args):
        if busy or event not in _FILE_EVENTS:
            return
        busy.append(1)
        try:
            path = _writing(event, args)
            starts_writing = path is not None and os.path.abspath(path) in (target, f"{target}.tmp")
            if when == "before" and starts_writing:
                os.kill(os.getpid(), signal.SIGKILL)
            if when == "after":
                if written[0] and os.path.exists(target):
                    os.kill(os.getpid(), signal.SIGKILL)
                written[0] = written[0] or starts_writing
        finally:
            busy.pop()

    sys.addaudithook(hook)


if __name__ == "__main__":
    root, target, when, *argv = sys.argv[1:]
    import torch

    torch.set_num_threads(1)
    install(os.path.join(root, target), when)
    from gere_hf import cli

    sys.exit(cli.main(argv))
