"""Durable file updates shared by the master's op log and the chunkservers' store."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_FSYNCS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kubegfs-fsync")


def fsync_path(path: Path, data_only: bool = False) -> None:
    """fsync (or fdatasync) a file or directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names created, renamed or removed in ``path`` durable."""
    fsync_path(path)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: ``<name>.tmp``, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_together(fds: Sequence[int], meanwhile: Callable[[], T] | None = None) -> T | None:
    """fsync the files ``fds`` at once, each in its own thread: concurrent fsyncs on one file
    system share its journal commits (two small new files on ext4 ~0.36 ms, three ~0.4 ms,
    against ~0.5 and ~0.8 ms one after the other). ``meanwhile()`` runs in this thread as they
    go; its result is returned once every fsync is done, or its error raised (else the first
    fsync's)."""
    mine = None if meanwhile is not None or not fds else fds[0]
    futs = [_FSYNCS.submit(os.fsync, fd) for fd in (fds if mine is None else fds[1:])]
    try:
        if meanwhile is not None:
            got = meanwhile()
        else:
            got = None
            if mine is not None:
                os.fsync(mine)
    finally:
        wait(futs)
    for f in futs:
        f.result()
    return got


def pwrite_all(fd: int, parts: Sequence[bytes], offset: int) -> None:
    """All of ``parts`` at ``offset``: ``pwritev`` (at most IOV_MAX parts at a time), resumed
    after a short write."""
    i = 0
    while i < len(parts):
        batch = parts[i : i + 512]
        want = sum(len(p) for p in batch)
        n = os.pwritev(fd, batch, offset)
        if n < want:  # short write: finish this batch the plain way
            rest = b"".join(bytes(p) for p in batch)[n:]
            while rest:
                k = os.pwrite(fd, rest, offset + n)
                n += k
                rest = rest[k:]
        offset += want
        i += len(batch)
