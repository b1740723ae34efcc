"""The SnapObj record: a point-in-time directory subtree, its file metadata and chunk handles.

The seed pickled a deep copy of the metadata and sent it over a raw socket. Here the record is
versioned, compact (packed columns + zstd: a few bytes per file), self-describing (a header with
the snapshot's identity and counts) and protected by a sha256 the catalog keeps. Decoding never
executes anything from the record.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptData
from .formats import (
    SNAP_MAGIC,
    decode_tree,
    encode_tree_with_handles,
    pack_handles,
    read_container,
    sha256_hex,
    write_container,
)
from .namespace import Node

FORMAT_VERSION = 2  # 2: breadth-first tree columns


@dataclass
class BuiltRecord:
    data: bytes
    sha256: str
    counts: dict[str, int]
    handles: Sequence[int]  # every chunk reference, in file order
    handles_z: bytes  # the same, packed for the op log (formats.pack_handles)


def build_record(meta: dict[str, Any], node: Node, version_of: Callable[[int], int]) -> BuiltRecord:
    """Serialise ``node`` (an immutable subtree) with ``meta`` (id, name, path, created, ...)."""
    cols, counts, handles = encode_tree_with_handles(node, version_of)
    header = dict(meta)
    header.update(counts)
    header["format"] = FORMAT_VERSION
    data = write_container(SNAP_MAGIC, FORMAT_VERSION, header, {"tree": cols})
    return BuiltRecord(data, sha256_hex(data), counts, handles, pack_handles(handles, cols["handles"]))


@dataclass
class ParsedRecord:
    header: dict[str, Any]
    root: Node
    chunks: list[tuple[int, int]]
    files: int
    dirs: int


def parse_record(data: bytes, expected_sha256: str | None = None) -> ParsedRecord:
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise CorruptData("snapshot record checksum mismatch")
    version, header, body = read_container(SNAP_MAGIC, data)
    if version != FORMAT_VERSION:
        raise CorruptData(f"unsupported snapshot record format {version}")
    tree = body.get("tree")
    if not isinstance(tree, dict):
        raise CorruptData("record has no tree")
    dec = decode_tree(tree)
    return ParsedRecord(header, dec.root, dec.chunks, dec.files, dec.dirs)


BUILDER_NICE = 10


def build_record_in_child(meta: dict[str, Any], node: Node, version_of: Callable[[int], int],
                          scratch: Path) -> BuiltRecord:
    """``build_record`` in a forked child process.

    The child sees the pinned immutable tree copy-on-write for free and does the O(files)
    encoding on its own core and its own interpreter lock, so the master keeps answering writers
    at full speed while a big snapshot is built. Blocking: call it from a worker thread. Falls
    back to building in-process where fork is unavailable.
    """
    if not hasattr(os, "fork"):
        return build_record(meta, node, version_of)
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"build-{os.getpid()}-{meta.get('id', 'x')}"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            # Background work: on a busy node the scheduler serves the master's writers first
            # (the build still gets any idle core, and a fair share under load).
            os.nice(BUILDER_NICE)
            rec = build_record(meta, node, version_of)
            side = json.dumps({"sha256": rec.sha256, "counts": rec.counts}).encode()
            with open(out, "wb") as f:
                f.write(struct.pack("<QQQ", len(rec.data), len(side), len(rec.handles_z)))
                f.write(rec.data)
                f.write(side)
                f.write(rec.handles_z)
                f.write(array("q", rec.handles).tobytes())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        if os.waitstatus_to_exitcode(status) != 0:
            raise CorruptData(f"snapshot builder process failed (status {status})")
        raw = out.read_bytes()
    finally:
        out.unlink(missing_ok=True)
    # the parent does no per-handle Python work here (it holds the GIL the writers need): the
    # handles stay a packed array and arrive already delta-coded and compressed for the log
    n_data, n_side, n_z = struct.unpack_from("<QQQ", raw, 0)
    view = memoryview(raw)[24:]
    data = bytes(view[:n_data])
    side = json.loads(bytes(view[n_data : n_data + n_side]))
    handles_z = bytes(view[n_data + n_side : n_data + n_side + n_z])
    handles = array("q")
    handles.frombytes(view[n_data + n_side + n_z :])
    return BuiltRecord(data, side["sha256"], side["counts"], handles, handles_z)
