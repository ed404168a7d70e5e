"""Several processes, several nodes: what the ranks of a build exchange over ``torch.distributed``.

No filesystem needs to be shared. Each rank writes its chunks where it sees ``out_dir``; the statistics are
all-gathered; rank 0 receives the chunk files it cannot see and assembles the store; every other directory that
does not show rank 0's files gets them, written by the lowest rank that sees that directory. Where a filesystem is
shared nothing is sent. The same calls run on gloo (CPU) and NCCL (GPU tensors). In one process every function here
is a no-op or returns its input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Sequence

import torch

from ..distributed import barrier, dist_info
from .errors import ReferenceStoreError
from .files import read_manifest, remove_store_files
from .format import MANIFEST, PROBE_PREFIX

logger = logging.getLogger(__name__)

_FILE_PIECE_BYTES = 64 << 20  # a file travels in pieces of this size: bounded memory on both sides


def comm_device() -> torch.device:
    """Where tensors for the default process group live: the CPU under gloo (also accelerate's 'cuda:nccl,cpu:gloo'),
    the current GPU under NCCL."""
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable ``obj``, in rank order (collective)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    device = comm_device()
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


def broadcast_json(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (collective); in one process, ``obj``."""
    rank, world = dist_info()
    if world == 1:
        return obj
    device = comm_device()
    data = json.dumps(obj).encode() if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank == src:
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    torch.distributed.broadcast(buf, src)
    return json.loads(buf.cpu().numpy().tobytes())


def broadcast_file(src: int, src_path: str | None, dst_path: str | None, blake2b: str | None = None) -> None:
    """Send the file ``src_path`` of rank ``src`` to every rank; those given a ``dst_path`` write it there atomically,
    checked against ``blake2b`` when given (collective)."""
    rank, _ = dist_info()
    device = comm_device()
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
        raise ReferenceStoreError(f"{dst_path} arrived corrupted from rank {src} (checksum mismatch). Run again.")
    os.replace(tmp, dst_path)


def fail_together(fn) -> None:
    """Run ``fn`` on every rank; a :class:`ReferenceStoreError` on any rank is raised on all of them, so that no
    rank goes on to a collective the others never reach (collective)."""
    error = None
    try:
        fn()
    except ReferenceStoreError as e:
        error = e
    messages = all_gather_json(None if error is None else str(error))
    if error is not None:
        raise error
    for r, message in enumerate(messages):
        if message is not None:
            raise ReferenceStoreError(f"Rank {r} stopped the reference store: {message}")


def directory_leaders(directory: str) -> list[int]:
    """For every rank, the lowest rank that sees the same ``directory`` (the same path on the same filesystem).

    Found by probing, not assumed from host names: the lowest rank not yet placed writes a probe file into its
    ``directory``, every unplaced rank that finds it in its own is placed with it, and so on (collective; one round
    per distinct directory). With a shared filesystem every rank is placed with rank 0 in one round.
    """
    rank, world = dist_info()
    if world == 1:
        return [0]
    token = broadcast_json(secrets.token_hex(8) if rank == 0 else None, 0)
    leaders = [-1] * world
    while -1 in leaders:
        leader = leaders.index(-1)
        name = f"{PROBE_PREFIX}{token}-{leader}"
        if rank == leader:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, name), "wb"):
                pass
        barrier()
        # Listing the directory (not a bare stat) makes network filesystems revalidate their cached entries.
        sees = leaders[rank] == -1 and os.path.isdir(directory) and name in os.listdir(directory)
        for r, seen in enumerate(all_gather_json(sees)):
            if seen or r == leader:
                leaders[r] = leader
        if rank == leader:
            os.remove(os.path.join(directory, name))
    return leaders


def sync_store(path: str, manifest: dict) -> None:
    """Give every directory that does not hold rank 0's store (``manifest``) a copy of it (collective)."""
    local = read_manifest(path)
    same = local is not None and local.get("files") == manifest["files"]
    everywhere = all_gather_json(same)
    if all(everywhere):
        return
    leaders = directory_leaders(path)
    receivers = sorted({leaders[r] for r, has in enumerate(everywhere) if not has} - {0})
    send_store(path, manifest, receivers)


def send_store(path: str, manifest: dict, receivers: Sequence[int]) -> None:
    """Rank 0's store files, the manifest last, written into ``path`` by the ``receivers`` (collective)."""
    rank, _ = dist_info()
    if not receivers:
        return
    receiving = rank in receivers
    if receiving:
        logger.info("Reference store: writing rank 0's store into %s (this node does not see rank 0's files).", path)
        os.makedirs(path, exist_ok=True)
        remove_store_files(path)
    for name, info in manifest["files"].items():
        broadcast_file(0, os.path.join(path, name) if rank == 0 else None,
                       os.path.join(path, name) if receiving else None, info["blake2b"])
    broadcast_file(0, os.path.join(path, MANIFEST) if rank == 0 else None,
                   os.path.join(path, MANIFEST) if receiving else None)
    barrier()
