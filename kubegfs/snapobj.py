"""The SnapObj record: a point-in-time directory subtree, its file metadata and chunk handles.

The seed pickled a deep copy of the metadata and sent it over a raw socket. Here the record is
versioned, self-describing (a header with the snapshot's identity and counts) and protected by a
sha256 the catalog keeps. Decoding never executes anything from the record.

* Format 3 (written now): the header and the digest of the snapshot's root directory block; the
  blocks it reaches are stored content-addressed beside it on the same chunkserver (merkle.py),
  so a snapshot after a small change ships a few blocks and a record of a few hundred bytes.
* Format 2 (still read, and written for a snapshot of a single file): the whole subtree as packed
  columns + zstd (a few bytes per file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CorruptData
from .formats import (
    SNAP_MAGIC,
    decode_tree,
    encode_tree_with_handles,
    pack_handles,
    read_container,
    read_header,
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


def _open_record(data: bytes, expected_sha256: str | None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """A record's container, its sha256 checked first when one is expected."""
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise CorruptData("snapshot record checksum mismatch")
    return read_container(SNAP_MAGIC, data)


def parse_record(data: bytes, expected_sha256: str | None = None) -> ParsedRecord:
    version, header, body = _open_record(data, expected_sha256)
    if version != FORMAT_VERSION:
        raise CorruptData(f"unsupported snapshot record format {version}")
    tree = body.get("tree")
    if not isinstance(tree, dict):
        raise CorruptData("record has no tree")
    dec = decode_tree(tree)
    return ParsedRecord(header, dec.root, dec.chunks, dec.files, dec.dirs)


# --------------------------------------------------------------------------- format 3: a root digest

MANIFEST_VERSION = 3  # 3: the record names a root directory block; the blocks live beside it


def build_manifest(meta: dict[str, Any], root: bytes, counts: dict[str, int]) -> tuple[bytes, str]:
    """A format-3 record: the snapshot's identity and counts and its root block's digest
    (the directory blocks it reaches are stored content-addressed beside it, see merkle.py)."""
    header = dict(meta)
    header.update(counts)
    header["format"] = MANIFEST_VERSION
    header["root"] = root.hex()
    data = write_container(SNAP_MAGIC, MANIFEST_VERSION, header, {"root": root})
    return data, sha256_hex(data)


@dataclass
class Manifest:
    header: dict[str, Any]
    root: bytes


def record_format(data: bytes) -> int:
    version, _header, _off = read_header(SNAP_MAGIC, data)
    return version


def parse_manifest(data: bytes, expected_sha256: str | None = None) -> Manifest:
    version, header, body = _open_record(data, expected_sha256)
    if version != MANIFEST_VERSION:
        raise CorruptData(f"not a format-{MANIFEST_VERSION} snapshot record (format {version})")
    root = body.get("root")
    if not isinstance(root, bytes) or len(root) != 32:
        raise CorruptData("record names no root block")
    return Manifest(header, root)
