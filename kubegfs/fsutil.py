"""Durable file updates shared by the master's op log and the chunkservers' store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


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
