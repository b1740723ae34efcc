"""On-disk and on-wire byte formats, all versioned and checksummed. Never pickle.

* Operation-log record:  ``<u32 length><u32 crc32(payload)><payload = msgpack map>``
* Container (checkpoint, SnapObj record): ``<magic 8><u16 version><u32 header length>
  <header = msgpack map><body = zstd(msgpack map)>``; a checkpoint adds a ``<u32 crc32>`` trailer,
  a snapshot record is protected by the sha256 of the whole record kept in the catalog.
* Chunk metadata: ``<magic 4><msgpack {v, len, crc}>`` with one CRC32 per 64 KiB block.
* Tree columns: the namespace subtree in pre-order as a handful of packed integer columns and a
  NUL-joined name column (compact and fast to encode; zstd does the rest).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import operator
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import immutables
import msgpack
import zstandard

from .errors import CorruptData
from .namespace import EMPTY, Dir, File, Node

BLOCK_SIZE = 64 * 1024
_REC_HDR = struct.Struct("<II")
MAX_LOG_RECORD = 1 << 30
MAX_HEADER = 1 << 20


def packb(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def packer() -> Callable[[Any], bytes]:
    """A function making :func:`packb`'s bytes, for many objects packed in a row (one packer
    made for them all, instead of one per object)."""
    pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
    return pack


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptData(f"undecodable msgpack: {exc}") from exc


# --------------------------------------------------------------------------- op log records


def frame(payload: bytes) -> bytes:
    return _REC_HDR.pack(len(payload), zlib.crc32(payload)) + payload


def record_digest(rec: Any) -> str:
    """Identifies one op-log record's content (metadata copies compare their last one with the
    master's, so a copy that took a record the master never made durable is not continued)."""
    return hashlib.sha256(frame(packb(rec))).hexdigest()


@dataclass
class LogScan:
    records: list[Any]
    good_bytes: int  # length of the valid prefix
    problem: str  # "" if the whole file was valid


def scan_log(data: bytes, padded: bool = False) -> LogScan:
    """Decode framed records; stop at the first torn or corrupt one and say why.

    ``padded``: the log was written over zeros (a pre-filled segment, ``chunkserver/metastore``),
    so a zero header (no record is empty) ends it cleanly when only zeros follow; ``good_bytes``
    is then the records' end, short of ``len(data)``. Anything else after it is a torn tail."""
    out: list[Any] = []
    pos = 0
    n = len(data)
    while pos < n:
        if padded and data[pos] == 0 and not data[pos:pos + _REC_HDR.size].strip(b"\0"):
            if len(data.rstrip(b"\0")) > pos:
                return LogScan(out, pos, f"non-zero bytes after the end of the records at byte {pos}")
            return LogScan(out, pos, "")
        if n - pos < _REC_HDR.size:
            return LogScan(out, pos, f"torn record header at byte {pos}")
        length, crc = _REC_HDR.unpack_from(data, pos)
        if length > MAX_LOG_RECORD:
            return LogScan(out, pos, f"implausible record length {length} at byte {pos}")
        end = pos + _REC_HDR.size + length
        if end > n:
            return LogScan(out, pos, f"torn record at byte {pos} ({n - pos} of {end - pos} bytes)")
        payload = data[pos + _REC_HDR.size : end]
        if zlib.crc32(payload) != crc:
            return LogScan(out, pos, f"checksum mismatch in record at byte {pos}")
        try:
            out.append(unpackb(payload))
        except CorruptData:
            return LogScan(out, pos, f"undecodable record at byte {pos}")
        pos = end
    return LogScan(out, pos, "")


# --------------------------------------------------------------------------- containers

CKPT_MAGIC = b"KGFSCKPT"
SNAP_MAGIC = b"KGFSSNAP"
_CONT = struct.Struct("<8sHI")
# zstd level 1: on tree columns it is both faster and smaller than level 3 (1M files: 0.13 s and
# 17.7 MB against 0.24 s and 18.5 MB); any level reads back the same
ZSTD_LEVEL = 1


def write_container(magic: bytes, version: int, header: dict[str, Any], body: dict[str, Any]) -> bytes:
    h = packb(header)
    b = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(packb(body))
    return _CONT.pack(magic, version, len(h)) + h + b


def read_header(magic: bytes, data: bytes) -> tuple[int, dict[str, Any], int]:
    if len(data) < _CONT.size:
        raise CorruptData("record too short")
    m, version, hlen = _CONT.unpack_from(data, 0)
    if m != magic:
        raise CorruptData(f"bad magic {m!r}, expected {magic!r}")
    if hlen > MAX_HEADER or _CONT.size + hlen > len(data):
        raise CorruptData("bad header length")
    header = unpackb(data[_CONT.size : _CONT.size + hlen])
    if not isinstance(header, dict):
        raise CorruptData("header is not a map")
    return version, header, _CONT.size + hlen


def read_container(magic: bytes, data: bytes, max_body: int = 1 << 34) -> tuple[int, dict[str, Any], dict[str, Any]]:
    version, header, off = read_header(magic, data)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[off:], max_output_size=max_body)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"bad compressed body: {exc}") from exc
    body = unpackb(raw)
    if not isinstance(body, dict):
        raise CorruptData("body is not a map")
    return version, header, body


def with_crc_trailer(data: bytes) -> bytes:
    return data + struct.pack("<I", zlib.crc32(data))


def check_crc_trailer(data: bytes) -> bytes:
    if len(data) < 4:
        raise CorruptData("file too short")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise CorruptData("checksum mismatch")
    return body


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- tree columns


def delta_encode(values: Iterable[int]) -> bytes:
    """Packed int64 first differences (small numbers that compress well)."""
    vals = list(values)
    return array("q", map(operator.sub, vals, [0, *vals[:-1]])).tobytes()


def delta_decode(data: bytes) -> array[int]:
    a = array("q")
    a.frombytes(data)
    return array("q", itertools.accumulate(a))


def pack_handles(handles: Iterable[int], delta: bytes | None = None) -> bytes:
    """A handle list (in file order: mostly ascending), delta-coded and compressed. ``delta``:
    the list's ``delta_encode`` if the caller has it already (a record's handle column)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(delta if delta is not None else delta_encode(handles))


def unpack_handles(data: bytes) -> list[int]:
    return delta_decode(zstandard.ZstdDecompressor().decompress(data)).tolist()


def encode_tree(node: Node, version_of: Callable[[int], int]) -> tuple[dict[str, bytes], dict[str, int]]:
    cols, counts, _handles = encode_tree_with_handles(node, version_of)
    return cols, counts


def encode_tree_with_handles(node: Node, version_of: Callable[[int], int]
                             ) -> tuple[dict[str, bytes], dict[str, int], list[int]]:
    """Like ``encode_tree``, also returning every chunk handle in file order."""
    with no_gc():
        return _encode_tree(node, version_of)


def _encode_tree(node: Node, version_of: Callable[[int], int]
                 ) -> tuple[dict[str, bytes], dict[str, int], list[int]]:
    """Columns for the subtree rooted at ``node`` in breadth-first order, and its counts
    (files, dirs, chunks, logical bytes). Breadth-first keeps each directory's children together,
    so names, modes and mtimes are copied a directory at a time instead of a node at a time."""
    names: list[str] = [""]
    modes: list[int] = [node.mode]
    mtimes: list[int] = [node.mtime]
    shape: list[int] = []
    sizes: list[int] = []
    nchunks: list[int] = []
    handles: list[int] = []
    queue: list[Dir] = []
    if type(node) is File:
        shape.append(-1)
        sizes.append(node.size)
        nchunks.append(len(node.chunks))
        handles.extend(node.chunks)
    else:
        assert isinstance(node, Dir)
        shape.append(len(node.children))
        queue.append(node)
    add_shape, add_size, add_nch, add_handles, add_dir = (
        shape.append, sizes.append, nchunks.append, handles.extend, queue.append)
    i = 0
    while i < len(queue):
        items = sorted(queue[i].children.items())  # canonical: the same tree, the same bytes
        i += 1
        names.extend([n for n, _k in items])
        kids = [k for _n, k in items]
        modes.extend([k.mode for k in kids])
        mtimes.extend([k.mtime for k in kids])
        for k in kids:
            if type(k) is File:
                add_shape(-1)
                add_size(k.size)
                c = k.chunks
                add_nch(len(c))
                add_handles(c)
            else:
                add_shape(len(k.children))
                add_dir(k)
    versions = array("q", [version_of(h) for h in handles])
    cols = {
        "order": b"bfs",
        "shape": array("q", shape).tobytes(),
        "names": "\x00".join(names).encode("utf-8"),
        "modes": array("q", modes).tobytes(),
        "mtimes": delta_encode(mtimes),
        "sizes": array("q", sizes).tobytes(),
        "nchunks": array("q", nchunks).tobytes(),
        "handles": delta_encode(handles),
        "versions": versions.tobytes(),
    }
    counts = {"files": len(sizes), "dirs": len(shape) - len(sizes), "chunks": len(handles),
              "bytes": sum(sizes)}
    return cols, counts, handles


@dataclass
class DecodedTree:
    root: Node
    files: int
    dirs: int
    size: int  # the files' logical bytes
    # every chunk reference's handle and version, file order; the handles are the very int
    # objects the tree's files hold (a caller keying a table by them adds no copy of each)
    handles: list[int] = field(default_factory=list)
    versions: array[int] = field(default_factory=lambda: array("q"))

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(handle, version) per reference, file order (made on demand: a recovering master
        does not need a tuple per chunk)."""
        return list(zip(self.handles, self.versions, strict=True))


def _build_tree(shape: list[int], names: list[str], modes: list[int], mtimes: list[int],
                sizes: list[int], nch: list[int], handles: list[int]) -> Node:
    """Rebuild the tree from breadth-first columns: files first, then directories from the last
    to the first, so every child exists before its parent's map is made from a slice."""
    n = len(shape)
    nodes: list[Any] = [None] * n
    fi = hi = 0
    n_files, n_handles = len(sizes), len(handles)
    file_t, dir_t, hamt = File, Dir, immutables.Map
    dirs: list[int] = []
    for i in range(n):
        s = shape[i]
        if s < 0:
            if fi >= n_files:
                raise CorruptData("more files than sizes")
            k = nch[fi]
            if k < 0 or hi + k > n_handles:
                raise CorruptData("chunk count out of range")
            nodes[i] = file_t(sizes[fi], mtimes[i], modes[i], tuple(handles[hi:hi + k]))
            fi += 1
            hi += k
        else:
            dirs.append(i)
    if fi != n_files or hi != n_handles:
        raise CorruptData("tree columns have trailing entries")
    if any(not nm or "/" in nm for nm in names[1:]):
        raise CorruptData("bad name in tree")
    starts: list[int] = []
    pos = 1
    for i in dirs:
        if pos <= i:
            raise CorruptData("a directory's children come before it")
        starts.append(pos)
        pos += shape[i]
    if pos != n:
        raise CorruptData("tree shape does not cover its columns")
    for j in range(len(dirs) - 1, -1, -1):
        i = dirs[j]
        s, e = starts[j], starts[j] + shape[i]
        children = hamt(zip(names[s:e], nodes[s:e], strict=True)) if e > s else EMPTY
        if len(children) != e - s:
            raise CorruptData("duplicate names in a directory")
        nodes[i] = dir_t(children, mtimes[i], modes[i])
    root: Node = nodes[0]
    return root


@contextlib.contextmanager
def no_gc(long_lived: bool = False) -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of acyclic objects: each
    generation-2 pass would rescan everything built so far (decoding 1M files: 4.9 s -> 1.3 s).
    ``long_lived``: what was built lives as long as the process (the master's state from its
    checkpoint): it goes to the collector's permanent generation (``gc.freeze``), so the first
    full pass after this does not scan it either (1M files: ~1 s). Freed objects are still
    freed (reference counting); only cycles among them would never be collected, and the
    namespace has none."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if long_lived:
            gc.freeze()
        if was:
            gc.enable()


def decode_tree(cols: dict[str, Any], long_lived: bool = False) -> DecodedTree:
    with no_gc(long_lived):
        return _decode_tree(cols)


def _decode_tree(cols: dict[str, Any]) -> DecodedTree:
    try:
        shape = array("q")
        shape.frombytes(cols["shape"])
        names = cols["names"].decode("utf-8").split("\x00")
        modes = array("q")
        modes.frombytes(cols["modes"])
        mtimes = delta_decode(cols["mtimes"])
        sizes = array("q")
        sizes.frombytes(cols["sizes"])
        nch = array("q")
        nch.frombytes(cols["nchunks"])
        handles = delta_decode(cols["handles"])
        versions = array("q")
        versions.frombytes(cols["versions"])
        if cols.get("order") != b"bfs":
            raise CorruptData("unsupported tree column order")
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CorruptData(f"bad tree columns: {exc}") from exc
    n = len(shape)
    if not (len(names) == len(modes) == len(mtimes) == n) or len(handles) != len(versions):
        raise CorruptData("tree columns disagree in length")
    if n == 0:
        raise CorruptData("empty tree")
    hlist = handles.tolist()
    ml = modes.tolist()
    same: dict[int, int] = {}  # one int object per distinct mode (a few), not one per entry
    root = _build_tree(shape.tolist(), names, list(map(same.setdefault, ml, ml)), mtimes.tolist(),
                       sizes.tolist(), nch.tolist(), hlist)
    files = len(sizes)
    return DecodedTree(root, files, n - files, sum(sizes), hlist, versions)


# --------------------------------------------------------------------------- chunk metadata

CHUNK_META_MAGIC = b"KGCM"


def encode_chunk_meta(version: int, length: int, crcs: array[int]) -> bytes:
    return CHUNK_META_MAGIC + packb({"v": version, "len": length, "crc": crcs.tobytes()})


def decode_chunk_meta(data: bytes) -> tuple[int, int, array[int]]:
    if data[:4] != CHUNK_META_MAGIC:
        raise CorruptData("bad chunk metadata magic")
    d = unpackb(data[4:])
    try:
        crcs = array("I")
        crcs.frombytes(d["crc"])
        return int(d["v"]), int(d["len"]), crcs
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"bad chunk metadata: {exc}") from exc
