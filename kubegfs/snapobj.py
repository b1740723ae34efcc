"""The SnapObj record: a point-in-time directory subtree, its file metadata and chunk handles.

The seed pickled a deep copy of the metadata and sent it over a raw socket. Here the record is
versioned, compact (packed columns + zstd: a few bytes per file), self-describing (a header with
the snapshot's identity and counts) and protected by a sha256 the catalog keeps. Decoding never
executes anything from the record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CorruptData
from .formats import (
    SNAP_MAGIC,
    decode_tree,
    delta_decode,
    encode_tree,
    read_container,
    read_header,
    sha256_hex,
    write_container,
)
from .namespace import Node

FORMAT_VERSION = 1


@dataclass
class BuiltRecord:
    data: bytes
    sha256: str
    counts: dict[str, int]
    handles: list[int]


def build_record(meta: dict[str, Any], node: Node, version_of: Callable[[int], int]) -> BuiltRecord:
    """Serialise ``node`` (an immutable subtree) with ``meta`` (id, name, path, created, ...)."""
    cols, counts = encode_tree(node, version_of)
    header = dict(meta)
    header.update(counts)
    header["format"] = FORMAT_VERSION
    data = write_container(SNAP_MAGIC, FORMAT_VERSION, header, {"tree": cols})
    handles = delta_decode(cols["handles"]).tolist()
    return BuiltRecord(data, sha256_hex(data), counts, handles)


@dataclass
class ParsedRecord:
    header: dict[str, Any]
    root: Node
    chunks: list[tuple[int, int]]
    files: int
    dirs: int


def record_header(data: bytes) -> dict[str, Any]:
    return read_header(SNAP_MAGIC, data)[1]


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
