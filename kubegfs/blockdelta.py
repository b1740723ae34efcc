"""Directory blocks shipped as deltas against blocks their holder has.

After a small change a snapshot ships, per changed directory, a leaf sub-block, an index
sub-block per level and the head, and each ancestor's block; each differs from the block at the
same place in the previous snapshot of the same path, which the holder has, by an entry, a
digest or an mtime. Such a block goes as a delta against that older block (its *base*): when the
two are the same length, the zstd of their XOR (zero but where they differ); else zstd with the
base as a raw-content dictionary. A block without a usable base goes whole.

Wire format (``POST /internal/blocks/delta``): ``KGBD``, the sha256 of the blocks' digests
concatenated in frame order (32 bytes), then frames ``<u8 kind><uvarint length><payload>``:
kind 0 ``zstd(block)``; kind 1 ``<8-byte digest prefix of the base>zstd(block XOR base)``;
kind 2 ``<8-byte prefix>zstd(block; dictionary base)``. A frame does not carry its block's digest:
the holder rebuilds every block, hashes it and refuses the batch whole unless the hashes, in
order, give the batch's check, so each block is verified on receipt as with whole frames. A base
the holder lacks (or a prefix naming another block: the result fails the check) refuses the
batch and the sender ships it whole. The holder stores the blocks as ``zstd(block)``, as if they
had come whole: a stored block never depends on another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container
from typing import NamedTuple

import zstandard

from .errors import Conflict, CorruptData
from .formats import ZSTD_LEVEL
from .merkle import DIGEST_SIZE, MAX_BLOCK, block_digest, compress, decompress
from .namespace import Dir, changed_names

MAGIC = b"KGBD"
PREFIX = 8  # bytes of a base's digest naming it in a frame
WHOLE, XOR, DICT = 0, 1, 2


class Outgoing(NamedTuple):
    """A block to ship: its digest, its payload (``zstd(block)``, or a delta against ``base``),
    and the digest of the base (None: whole)."""
    digest: bytes
    payload: bytes
    base: bytes | None = None
    kind: int = WHOLE


class MissingBase(Conflict):
    """A delta's base is not on this holder (ship the batch whole)."""


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def delta(data: bytes, base: bytes) -> tuple[int, bytes]:
    """(kind, payload without the base's prefix) of ``data`` against ``base``."""
    if len(data) == len(base):
        return XOR, compress(_xor(data, base))
    d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=d, write_checksum=False, write_dict_id=False)
    return DICT, c.compress(data)


def undelta(kind: int, payload: bytes, base: bytes) -> bytes:
    """The block a delta payload (without the prefix) gives against ``base``."""
    if kind == XOR:
        x = decompress(payload)
        if len(x) != len(base):
            raise CorruptData("a block delta does not match its base's length")
        return _xor(x, base)
    d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    try:
        out: bytes = zstandard.ZstdDecompressor(dict_data=d).decompress(payload, max_output_size=MAX_BLOCK)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"bad block delta: {exc}") from exc
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pack(items: list[Outgoing]) -> bytes:
    """A batch of blocks on the wire (see the module's docstring)."""
    out = [MAGIC, hashlib.sha256(b"".join(it.digest for it in items)).digest()]
    for it in items:
        if len(it.digest) != DIGEST_SIZE:
            raise ValueError("digest must be 32 bytes")
        head = b"" if it.base is None else it.base[:PREFIX]
        out += (bytes([it.kind]), _varint(len(head) + len(it.payload)), head, it.payload)
    return b"".join(out)


def unpack(body: bytes, base_of: Callable[[bytes], bytes | None]) -> list[tuple[bytes, bytes, bytes | None]]:
    """A batch back into (digest, block, ``zstd(block)`` if the frame carried it whole), each
    block hashed and the batch checked; ``base_of`` gives the block a digest prefix names on
    this holder (None: absent, :class:`MissingBase`)."""
    if body[:4] != MAGIC or len(body) < 4 + DIGEST_SIZE:
        raise CorruptData("not a block delta batch")
    check = body[4:4 + DIGEST_SIZE]
    pos, n = 4 + DIGEST_SIZE, len(body)
    out: list[tuple[bytes, bytes, bytes | None]] = []
    add = out.append
    while pos < n:
        kind = body[pos]
        pos += 1
        ln = shift = 0
        while True:
            if pos >= n or shift > 35:
                raise CorruptData("truncated block frame")
            b = body[pos]
            pos += 1
            ln |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        end = pos + ln
        if end > n:
            raise CorruptData("truncated block frame")
        if kind == XOR or kind == DICT:
            if ln < PREFIX:
                raise CorruptData("truncated block frame")
            base = base_of(body[pos:pos + PREFIX])
            if base is None:
                raise MissingBase(f"the base {body[pos:pos + PREFIX].hex()}… of a block delta is not here")
            blk = undelta(kind, body[pos + PREFIX:end], base)
            add((block_digest(blk), blk, None))
        elif kind == WHOLE:
            z = body[pos:end]
            blk = decompress(z)
            add((block_digest(blk), blk, z))
        else:
            raise CorruptData(f"unknown block frame kind {kind}")
        pos = end
    if hashlib.sha256(b"".join([dg for dg, _b, _z in out])).digest() != check:
        raise CorruptData("a block of the batch does not match the digest it was sent for")
    return out


def counterparts(old: Dir, new: Dir, done: Container[bytes] = ()) -> dict[int, Dir]:
    """For each directory of ``new``'s tree whose digest differs from that of the directory at
    its place in ``old``'s, that older directory (by ``id`` of the newer one); both trees'
    digests are memoised. A directory whose digest is in ``done`` (its blocks and all below it
    prepared already: see ``snapshots.prepare``) is not entered, nor counted."""
    out: dict[int, Dir] = {}
    stack = [(old, new)]
    while stack:
        a, b = stack.pop()
        if a.digest is not None and a.digest == b.digest or b.digest in done:
            continue
        out[id(b)] = a
        if b.stats is not None and b.stats[1] == 1:  # no subdirectories
            continue
        ach, bch = a.children, b.children
        names = changed_names(a, b)
        for name, k in (bch.items() if names is None else ((n, bch.get(n)) for n in names)):
            if type(k) is Dir:
                o = ach.get(name)
                if type(o) is Dir:
                    stack.append((o, k))
    return out
