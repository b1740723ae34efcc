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
from dataclasses import dataclass
from typing import Any, BinaryIO

import immutables
import msgpack
import zstandard

from .errors import CorruptData, InvalidArgument
from .namespace import EMPTY, Dir, File, Node

BLOCK_SIZE = 64 * 1024
_REC_HDR = struct.Struct("<II")
MAX_LOG_RECORD = 1 << 30
MAX_HEADER = 1 << 20


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptData(f"undecodable msgpack: {exc}") from exc


# --------------------------------------------------------------------------- op log records


def frame(payload: bytes) -> bytes:
    return _REC_HDR.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass
class LogScan:
    records: list[Any]
    good_bytes: int  # length of the valid prefix
    problem: str  # "" if the whole file was valid


def scan_log(data: bytes) -> LogScan:
    """Decode framed records; stop at the first torn or corrupt one and say why."""
    out: list[Any] = []
    pos = 0
    n = len(data)
    while pos < n:
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
_ZC = zstandard.ZstdCompressor(level=3)


def write_container(magic: bytes, version: int, header: dict[str, Any], body: dict[str, Any]) -> bytes:
    h = packb(header)
    b = zstandard.ZstdCompressor(level=3).compress(packb(body))
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


def delta_decode(data: bytes) -> array:
    a = array("q")
    a.frombytes(data)
    return array("q", itertools.accumulate(a))


_delta = delta_encode
_undelta = delta_decode


def encode_tree(node: Node, version_of: Callable[[int], int]) -> tuple[dict[str, bytes], dict[str, int]]:
    with no_gc():
        return _encode_tree(node, version_of)


def _encode_tree(node: Node, version_of: Callable[[int], int]) -> tuple[dict[str, bytes], dict[str, int]]:
    """Columns for the subtree rooted at ``node`` and its counts
    (files, dirs, chunks, logical bytes)."""
    shape: list[int] = []
    names: list[str] = []
    modes: list[int] = []
    mtimes: list[int] = []
    sizes: list[int] = []
    nchunks: list[int] = []
    handles: list[int] = []
    stack: list[tuple[str, Node]] = [("", node)]
    pop, push = stack.pop, stack.extend
    file_t = File
    files = dirs = total = 0
    while stack:
        name, n = pop()
        names.append(name)
        modes.append(n.mode)
        mtimes.append(n.mtime)
        if type(n) is file_t:
            shape.append(-1)
            sizes.append(n.size)
            total += n.size
            nchunks.append(len(n.chunks))
            handles.extend(n.chunks)
            files += 1
        else:
            ch = n.children  # type: ignore[union-attr]
            shape.append(len(ch))
            items = list(ch.items())
            items.reverse()
            push(items)
            dirs += 1
    versions = array("q", [version_of(h) for h in handles])
    cols = {
        "shape": array("q", shape).tobytes(),
        "names": "\x00".join(names).encode("utf-8"),
        "modes": array("q", modes).tobytes(),
        "mtimes": _delta(mtimes),
        "sizes": array("q", sizes).tobytes(),
        "nchunks": array("q", nchunks).tobytes(),
        "handles": _delta(handles),
        "versions": versions.tobytes(),
    }
    counts = {"files": files, "dirs": dirs, "chunks": len(handles), "bytes": total}
    return cols, counts


@dataclass
class DecodedTree:
    root: Node
    chunks: list[tuple[int, int]]  # (handle, version) per reference, file order
    files: int
    dirs: int


def _build_tree(shape: list[int], names: list[str], modes: list[int], mtimes: list[int],
                sizes: list[int], nch: list[int], handles: list[int]) -> Node:
    """Rebuild the tree from pre-order columns without recursion: a stack of open directories,
    each collecting (name, node) pairs until its child count is reached."""
    n = len(shape)
    n_files = len(sizes)
    n_handles = len(handles)
    stack: list[list[Any]] = []  # [pairs, children left, mtime, mode, name]
    fi = hi = 0
    root: Node | None = None
    file_t, dir_t, hamt = File, Dir, immutables.Map
    for i in range(n):
        s = shape[i]
        name = names[i]
        if i and (not name or "/" in name):
            raise CorruptData("bad name in tree")
        if s < 0:
            if fi >= n_files:
                raise CorruptData("more files than sizes")
            k = nch[fi]
            if k < 0 or hi + k > n_handles:
                raise CorruptData("chunk count out of range")
            node: Node = file_t(sizes[fi], mtimes[i], modes[i], tuple(handles[hi:hi + k]))
            fi += 1
            hi += k
        elif s > 0:
            stack.append([[], s, mtimes[i], modes[i], name])
            continue
        else:
            node = dir_t(EMPTY, mtimes[i], modes[i])
        while True:
            if not stack:
                if root is not None or i != n - 1:
                    raise CorruptData("tree columns have trailing entries")
                root = node
                break
            top = stack[-1]
            top[0].append((name, node))
            top[1] -= 1
            if top[1]:
                break
            stack.pop()
            node = dir_t(hamt(top[0]), top[2], top[3])
            name = top[4]
    if root is None or stack:
        raise CorruptData("tree shape runs past its columns")
    if fi != n_files or hi != n_handles:
        raise CorruptData("tree columns have trailing entries")
    return root


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of acyclic objects: each
    generation-2 pass would rescan everything built so far (decoding 1M files: 4.9 s -> 1.3 s)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode_tree(cols: dict[str, Any]) -> DecodedTree:
    with no_gc():
        return _decode_tree(cols)


def _decode_tree(cols: dict[str, Any]) -> DecodedTree:
    try:
        shape = array("q")
        shape.frombytes(cols["shape"])
        names = cols["names"].decode("utf-8").split("\x00")
        modes = array("q")
        modes.frombytes(cols["modes"])
        mtimes = _undelta(cols["mtimes"])
        sizes = array("q")
        sizes.frombytes(cols["sizes"])
        nch = array("q")
        nch.frombytes(cols["nchunks"])
        handles = _undelta(cols["handles"])
        versions = array("q")
        versions.frombytes(cols["versions"])
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CorruptData(f"bad tree columns: {exc}") from exc
    n = len(shape)
    if not (len(names) == len(modes) == len(mtimes) == n) or len(handles) != len(versions):
        raise CorruptData("tree columns disagree in length")
    if n == 0:
        raise CorruptData("empty tree")
    root = _build_tree(shape.tolist(), names, modes.tolist(), mtimes.tolist(), sizes.tolist(),
                       nch.tolist(), handles.tolist())
    chunks = list(zip(handles.tolist(), versions.tolist(), strict=True))
    dirs = sum(1 for s in shape if s >= 0)
    return DecodedTree(root, chunks, n - dirs, dirs)


# --------------------------------------------------------------------------- chunk metadata

CHUNK_META_MAGIC = b"KGCM"


def encode_chunk_meta(version: int, length: int, crcs: array) -> bytes:
    return CHUNK_META_MAGIC + packb({"v": version, "len": length, "crc": crcs.tobytes()})


def decode_chunk_meta(data: bytes) -> tuple[int, int, array]:
    if data[:4] != CHUNK_META_MAGIC:
        raise CorruptData("bad chunk metadata magic")
    d = unpackb(data[4:])
    try:
        crcs = array("I")
        crcs.frombytes(d["crc"])
        return int(d["v"]), int(d["len"]), crcs
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptData(f"bad chunk metadata: {exc}") from exc


def block_crcs(data: bytes | memoryview, start_block: int = 0) -> Iterator[tuple[int, int]]:
    for i in range(0, len(data), BLOCK_SIZE):
        yield start_block + i // BLOCK_SIZE, zlib.crc32(data[i : i + BLOCK_SIZE])


def read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptData("short read")
    return data


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidArgument(msg)
