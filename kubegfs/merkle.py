"""Content-addressed directory blocks (a Merkle tree over the namespace).

One directory is one *block*: its own mode and mtime, its entries in name order (files with size,
mtime, mode, chunk handles and their versions) and, for each child directory, that directory's
digest. A block's name is the sha256 of its bytes, so a root digest names a whole tree and two
trees with the same content have the same root digest whatever history made them.

Block format 1 (canonical: one tree, one byte string): a msgpack array
``[1, mode, mtime, names, kinds, f_size, f_mtime, f_mode, f_nchunks, handles, versions, dirs]``
where ``names`` is the entries' UTF-8 names joined by NUL in code-point order, ``kinds`` one byte
per entry (``f`` file, ``d`` directory), the ``f_*``/``handles``/``versions`` columns packed
little-endian int64 for the files in entry order, and ``dirs`` the 32-byte digests of the child
directories in entry order.

The namespace's directory nodes are immutable, so :func:`digest` memoises a node's digest on the
node (``Dir.digest``): after a mutation only the directories on its path (new nodes) are encoded
again. Invariant: a block records each chunk's version as of the block's encoding, and a memoised
digest is never stale: a chunk's version changes only through a bump (before an in-place append
to a chunk no snapshot shares), and the bump op names the file, whose directories it replaces
with new nodes (state._apply_bump), so their digests are computed afresh, in the original run and
in a replay alike.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import immutables
import zstandard

from .errors import CorruptData
from .formats import ZSTD_LEVEL, no_gc, packb, unpackb
from .namespace import EMPTY, Dir, File, Node

BLOCK_FORMAT = 1
DIGEST_SIZE = 32
_BIG_ENDIAN = sys.byteorder == "big"

VersionOf = Callable[[int], int]


def _pack(values: list[int]) -> bytes:
    a = array("q", values)
    if _BIG_ENDIAN:  # pragma: no cover - canonical bytes on every machine
        a.byteswap()
    return a.tobytes()


def _unpack(data: object) -> list[int]:
    if not isinstance(data, bytes) or len(data) % 8:
        raise CorruptData("bad packed column in block")
    a = array("q")
    a.frombytes(data)
    if _BIG_ENDIAN:  # pragma: no cover
        a.byteswap()
    return a.tolist()


def block_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encode_block(d: Dir, version_of: VersionOf, child_digest: Callable[[Dir], bytes]) -> bytes:
    """The canonical bytes of directory ``d`` (its children's digests from ``child_digest``)."""
    items = sorted(d.children.items())
    kinds = bytearray()
    sizes: list[int] = []
    mtimes: list[int] = []
    modes: list[int] = []
    nch: list[int] = []
    handles: list[int] = []
    dirs: list[bytes] = []
    for _name, k in items:
        if type(k) is File:
            kinds += b"f"
            sizes.append(k.size)
            mtimes.append(k.mtime)
            modes.append(k.mode)
            nch.append(len(k.chunks))
            handles.extend(k.chunks)
        else:
            assert isinstance(k, Dir)
            kinds += b"d"
            dirs.append(child_digest(k))
    names = "\x00".join([n for n, _k in items]).encode("utf-8")
    return packb([BLOCK_FORMAT, d.mode, d.mtime, names, bytes(kinds), _pack(sizes), _pack(mtimes),
                  _pack(modes), _pack(nch), _pack(handles), _pack([version_of(h) for h in handles]),
                  b"".join(dirs)])


def digest(d: Dir, version_of: VersionOf) -> bytes:
    """``d``'s block digest, computed once per node (memoised on the immutable node)."""
    got = d.digest
    if got is not None:
        return got
    with no_gc():
        return _digest(d, version_of)


def _digest(d: Dir, version_of: VersionOf) -> bytes:
    got = d.digest
    if got is None:
        for k in d.children.values():
            if type(k) is Dir:
                _digest(k, version_of)
        d.stats = _sum_stats(d)
        got = d.digest = block_digest(encode_block(d, version_of, lambda c: _digest(c, version_of)))
    return got


def _sum_stats(d: Dir) -> tuple[int, int, int, int] | None:
    """``d``'s counts from its files and its subdirectories' memoised counts (None if one lacks them)."""
    files, dirs, chunks, size = 0, 1, 0, 0
    for k in d.children.values():
        if type(k) is File:
            files += 1
            chunks += len(k.chunks)
            size += k.size
        else:
            assert isinstance(k, Dir)
            if k.stats is None:
                return None
            f2, d2, c2, s2 = k.stats
            files, dirs, chunks, size = files + f2, dirs + d2, chunks + c2, size + s2
    return files, dirs, chunks, size


def stats(d: Dir, version_of: VersionOf) -> tuple[int, int, int, int]:
    """(files, directories, chunk references, logical bytes) below and including ``d``, memoised
    with its digest (so a snapshot's counts cost what its digest costs)."""
    digest(d, version_of)
    assert d.stats is not None
    return d.stats


# --------------------------------------------------------------------------- decoded blocks


@dataclass(frozen=True)
class FileEntry:
    size: int
    mtime: int
    mode: int
    chunks: tuple[int, ...]
    versions: tuple[int, ...]


@dataclass(frozen=True)
class DirRef:
    digest: bytes
    node: Dir | None = None  # the live directory with this digest, when the block came from one


Entry = FileEntry | DirRef


@dataclass(frozen=True)
class Block:
    mode: int
    mtime: int
    entries: dict[str, Entry]  # in name order


def decode_block(data: bytes, expected: bytes | None = None) -> Block:
    """A block from its bytes, verified against ``expected`` (its name) when given."""
    if expected is not None and block_digest(data) != expected:
        raise CorruptData("directory block does not match its digest")
    raw = unpackb(data)
    if not (isinstance(raw, list) and len(raw) == 12 and raw[0] == BLOCK_FORMAT):
        raise CorruptData("not a directory block of a known format")
    _fmt, mode, mtime, names_b, kinds, *cols, dirs = raw
    if not (isinstance(mode, int) and isinstance(mtime, int) and isinstance(names_b, bytes)
            and isinstance(kinds, bytes) and isinstance(dirs, bytes)):
        raise CorruptData("bad directory block fields")
    sizes, mtimes, modes, nch, handles, versions = (_unpack(c) for c in cols)
    try:
        names = names_b.decode("utf-8").split("\x00") if kinds else []
    except UnicodeDecodeError as exc:
        raise CorruptData("bad name in block") from exc
    n_files = kinds.count(b"f")
    if (len(names) != len(kinds) or n_files + kinds.count(b"d") != len(kinds)
            or not len(sizes) == len(mtimes) == len(modes) == len(nch) == n_files
            or len(handles) != len(versions) or sum(nch) != len(handles) or any(c < 0 for c in nch)
            or len(dirs) != DIGEST_SIZE * (len(kinds) - n_files)):
        raise CorruptData("directory block columns disagree")
    if any(not nm or "/" in nm for nm in names) or any(a >= b for a, b in zip(names, names[1:], strict=False)):
        raise CorruptData("block names are not valid, unique and in order")
    entries: dict[str, Entry] = {}
    fi = hi = di = 0
    for name, kind in zip(names, kinds, strict=True):
        if kind == 0x66:  # f
            k = nch[fi]
            entries[name] = FileEntry(sizes[fi], mtimes[fi], modes[fi], tuple(handles[hi:hi + k]),
                                      tuple(versions[hi:hi + k]))
            fi += 1
            hi += k
        else:
            entries[name] = DirRef(dirs[di:di + DIGEST_SIZE])
            di += DIGEST_SIZE
    return Block(mode, mtime, entries)


def block_of(d: Dir, version_of: VersionOf) -> Block:
    """The decoded block of a live directory (without encoding it; child digests memoised)."""
    entries: dict[str, Entry] = {}
    for name, k in sorted(d.children.items()):
        if type(k) is File:
            entries[name] = FileEntry(k.size, k.mtime, k.mode, k.chunks, tuple(version_of(h) for h in k.chunks))
        else:
            assert isinstance(k, Dir)
            entries[name] = DirRef(digest(k, version_of), k)
    return Block(d.mode, d.mtime, entries)


def child_digests(data: bytes) -> list[bytes]:
    """The digests of the directories a block names (without building its entries)."""
    raw = unpackb(data)
    if not (isinstance(raw, list) and len(raw) == 12 and isinstance(raw[11], bytes)) or len(raw[11]) % DIGEST_SIZE:
        raise CorruptData("not a directory block of a known format")
    dirs: bytes = raw[11]
    return [dirs[i:i + DIGEST_SIZE] for i in range(0, len(dirs), DIGEST_SIZE)]


def block_chunks(data: bytes) -> list[int]:
    """The chunk handles a block's own files reference (one per reference)."""
    raw = unpackb(data)
    if not (isinstance(raw, list) and len(raw) == 12):
        raise CorruptData("not a directory block of a known format")
    return _unpack(raw[9])


# --------------------------------------------------------------------------- walking trees


def iter_blocks(root: Dir, version_of: VersionOf, skip: Callable[[bytes], bool]
                ) -> Iterator[tuple[bytes, bytes, Dir]]:
    """(digest, bytes, node) of every directory below and including ``root`` whose digest ``skip``
    does not accept, children before their parent; a skipped directory's subtree is not visited
    (a holder that has a block has everything it reaches)."""
    out: list[tuple[bytes, bytes, Dir]] = []
    with no_gc():
        _collect(root, version_of, skip, out, set())
    yield from out


def _collect(d: Dir, version_of: VersionOf, skip: Callable[[bytes], bool],
             out: list[tuple[bytes, bytes, Dir]], seen: set[bytes]) -> None:
    dg = digest(d, version_of)
    if dg in seen or skip(dg):
        return
    seen.add(dg)
    for k in d.children.values():
        if type(k) is Dir:
            _collect(k, version_of, skip, out, seen)
    out.append((dg, encode_block(d, version_of, lambda c: digest(c, version_of)), d))


def build_dir(block: Block, child: Callable[[str, DirRef], Node]) -> Dir:
    """A namespace directory from a decoded block; ``child`` turns each directory reference
    (by name) into its node (a reused live node or one built from its own block)."""
    kids: list[tuple[str, Node]] = []
    for name, e in block.entries.items():
        if isinstance(e, FileEntry):
            kids.append((name, File(e.size, e.mtime, e.mode, e.chunks)))
        else:
            kids.append((name, child(name, e)))
    d = Dir(immutables.Map(kids) if kids else EMPTY, block.mtime, block.mode)
    return d


# --------------------------------------------------------------------------- block batches on the wire

_FRAME_HEAD = 36  # 32-byte digest + u32 length
MAX_BLOCK = 1 << 30  # a block decompresses to at most this (a directory of millions of entries)


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)


def decompress(data: bytes) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_BLOCK)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"bad compressed block: {exc}") from exc


def pack_frames(items: list[tuple[bytes, bytes]], compressed: bool = False) -> bytes:
    """Blocks on the wire (and in a chunkserver's packs): ``(<digest 32><u32 length><zstd(bytes)>)*``;
    ``compressed``: the items are compressed already."""
    out = bytearray()
    for dg, data in items:
        if len(dg) != DIGEST_SIZE:
            raise ValueError("digest must be 32 bytes")
        z = data if compressed else compress(data)
        out += dg + len(z).to_bytes(4, "little") + z
    return bytes(out)


def split_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Frames into (digest, compressed bytes), unverified."""
    out: list[tuple[bytes, bytes]] = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < _FRAME_HEAD:
            raise CorruptData("truncated block frame")
        dg = data[pos:pos + DIGEST_SIZE]
        ln = int.from_bytes(data[pos + DIGEST_SIZE:pos + _FRAME_HEAD], "little")
        end = pos + _FRAME_HEAD + ln
        if end > n:
            raise CorruptData("truncated block frame")
        out.append((dg, data[pos + _FRAME_HEAD:end]))
        pos = end
    return out


def verified(dg: bytes, z: bytes) -> bytes:
    """The block a compressed frame holds, checked against its digest."""
    blk = decompress(z)
    if block_digest(blk) != dg:
        raise CorruptData(f"block {dg.hex()[:16]}… does not match its digest")
    return blk


def unpack_frames(data: bytes, verify: bool = True) -> list[tuple[bytes, bytes]]:
    """Frames back into (digest, bytes); with ``verify`` every block must match its digest."""
    return [(dg, verified(dg, z) if verify else decompress(z)) for dg, z in split_frames(data)]


def batches(items: list[tuple[bytes, bytes]], limit: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """``items`` in consecutive groups of at most ``limit`` bytes (one oversized block alone)."""
    cur: list[tuple[bytes, bytes]] = []
    size = 0
    for it in items:
        if cur and size + len(it[1]) + _FRAME_HEAD > limit:
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += len(it[1]) + _FRAME_HEAD
    if cur:
        yield cur


# --------------------------------------------------------------------------- reference counting input


@dataclass(frozen=True)
class BlockInfo:
    """What the master keeps of a block a snapshot reaches: the blocks it names (one per
    reference) and the chunk handles its own files reference (packed int64)."""
    children: tuple[bytes, ...]
    handles: bytes


def block_info(data: bytes) -> BlockInfo:
    """The info of a block read back (``master recover`` from records)."""
    return BlockInfo(tuple(child_digests(data)), array("q", block_chunks(data)).tobytes())


def new_block_infos(root: Dir, version_of: VersionOf, known: Callable[[bytes], bool]
                    ) -> dict[bytes, BlockInfo]:
    """The blocks below ``root`` that ``known`` does not accept, without encoding them (every
    block a known block reaches is known too, so a known subtree is not visited)."""
    out: dict[bytes, BlockInfo] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        dg = digest(d, version_of)
        if dg in out or known(dg):
            continue
        kids: list[bytes] = []
        handles: list[int] = []
        for _name, k in sorted(d.children.items()):
            if type(k) is File:
                handles.extend(k.chunks)
            else:
                assert isinstance(k, Dir)
                kids.append(digest(k, version_of))
                stack.append(k)
        out[dg] = BlockInfo(tuple(kids), array("q", handles).tobytes())
    return out


# --------------------------------------------------------------------------- restore assembly


class NeedBlocks(Exception):
    """A restore needs blocks that were not supplied (fetch them and run again)."""

    def __init__(self, digests: list[bytes]) -> None:
        super().__init__(f"{len(digests)} directory blocks needed")
        self.digests = digests


def assemble(root: bytes, have: dict[bytes, bytes], live: list[Node | None], version_of: VersionOf,
             reused: list[tuple[tuple[str, ...], Dir]] | None = None) -> tuple[Dir, list[bytes]]:
    """The tree named by ``root``: a directory whose digest equals a live candidate's at the same
    place (``live``: roots compared with ``root``, e.g. the restore target and the snapshot's
    original path) is that live node, reused as it is; any other comes from its block in
    ``have``. Returns the tree and the digests of the blocks it decoded. Raises
    :class:`NeedBlocks` naming every missing block of the first level that lacks some (so a
    caller fetches level by level, only where the live tree differs). ``reused`` collects each
    live directory reused, with its path relative to the candidates' roots."""
    with no_gc():
        return _assemble(root, have, live, version_of, reused if reused is not None else [])


def _assemble(root: bytes, have: dict[bytes, bytes], live: list[Node | None], version_of: VersionOf,
              reused: list[tuple[tuple[str, ...], Dir]]) -> tuple[Dir, list[bytes]]:
    built: dict[int, Dir] = {}
    used: list[bytes] = []
    where: dict[int, tuple[str, ...]] = {0: ()}
    # breadth-first: (slot, digest, live candidates at this place); parent slot -> child slots
    level: list[tuple[int, bytes, list[Dir]]] = [(0, root, [c for c in live if isinstance(c, Dir)])]
    pending: list[tuple[int, Block, dict[str, int], bytes]] = []  # decoded blocks waiting for children
    slot = 1
    while level:
        missing = []
        for _s, dg, cands in level:
            if not any(digest(c, version_of) == dg for c in cands) and dg not in have:
                missing.append(dg)
        if missing:
            raise NeedBlocks(sorted(set(missing)))
        nxt: list[tuple[int, bytes, list[Dir]]] = []
        for s, dg, cands in level:
            reuse = next((c for c in cands if digest(c, version_of) == dg), None)
            if reuse is not None:
                built[s] = reuse
                reused.append((where[s], reuse))
                continue
            block = decode_block(have[dg], dg)
            used.append(dg)
            kids: dict[str, int] = {}
            for name, e in block.entries.items():
                if isinstance(e, DirRef):
                    kc = [x for x in (c.children.get(name) for c in cands) if isinstance(x, Dir)]
                    kids[name] = slot
                    where[slot] = where[s] + (name,)
                    nxt.append((slot, e.digest, kc))
                    slot += 1
            pending.append((s, block, kids, dg))
        level = nxt
    for s, block, kids, dg in reversed(pending):  # children were numbered after their parents
        d = build_dir(block, lambda name, _ref, kids=kids: built[kids[name]])  # type: ignore[misc]
        _memoise(d, dg)
        built[s] = d
    return built[0], used


def _memoise(d: Dir, dg: bytes) -> None:
    """Give a directory built from block ``dg`` its digest and counts (its children have theirs),
    so the next snapshot or diff of the restored tree does not encode it again."""
    counts = _sum_stats(d)
    if counts is not None:
        d.stats = counts
        d.digest = dg
