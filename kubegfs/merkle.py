"""Content-addressed directory blocks (a Merkle tree over the namespace).

A directory is a *head block* (its own mode and mtime) and, in name order, its entries (files
with size, mtime, mode, chunk handles and their versions; for each child directory, that
directory's head digest). A block's name is the sha256 of its bytes, so a root digest names a
whole tree and two trees with the same content have the same root digest whatever history made
them.

A big directory's entries are split into *sub-blocks* (a Prolly tree over its names, see
:func:`dir_blocks`): a run of entries ends after a name whose hash has ``threshold(0)`` leading
zero bits (2**LEAF_BITS entries per leaf on average), runs of sub-blocks end likewise at higher
thresholds, and the head names the top run. Boundaries depend only on the names present, so the
split is canonical, and one changed entry re-encodes, ships and re-reads one leaf, one index
sub-block per level and the head instead of the whole directory.

Block format 2 (canonical: one tree, one set of byte strings): a msgpack array
``[2, kind, mode, mtime, names, kinds, f_size, f_mtime, f_mode, f_nchunks, handles, versions,
dirs, parts]``: ``kind`` 0 a directory's head, 1 a sub-block (mode and mtime 0); ``names`` the
entries' UTF-8 names joined by NUL in code-point order, ``kinds`` one byte per entry (``f``
file, ``d`` directory), the ``f_*``/``handles``/``versions`` columns packed little-endian int64
for the files in entry order, ``dirs`` the 32-byte digests of the child directories in entry
order and ``parts`` the 32-byte digests of the sub-blocks holding the entries (a block has
entries or parts, not both). Format 1 (still read, records written before the split): one block
per directory, ``[1, mode, mtime, names, kinds, f_size, ..., versions, dirs]``.

The namespace's directory nodes are immutable, so :func:`digest` memoises a node's digest on the
node (``Dir.digest``): after a mutation only the directories on its path (new nodes) are encoded
again, and of each only the leaves around the names changed since the version of it last
digested (``Dir.base``, ``Dir.changed``; see :func:`_dir_blocks_from`). A digested directory
remembers the names changed since that base (``Dir.delta``) and since the version the last
snapshot's build shipped (``Dir.far``, see :func:`mark_shipped`), so that a walk for the blocks
a holder lacks visits only those names' subdirectories below one whose anchor it has; each is
true by construction (a directory is its anchor plus changes to those names) whoever has the
anchor's block, so neither can make a walk miss a block. Invariant: a block records each chunk's version as of the block's encoding, and a memoised
digest is never stale: a chunk's version changes only through a bump (before an in-place append
to a chunk no snapshot shares), and the bump op names the file, whose directories it replaces
with new nodes (state._apply_bump), so their digests are computed afresh, in the original run and
in a replay alike. A directory restored from blocks is memoised with their head's digest only
when they are in BLOCK_FORMAT (see :func:`_memoise`): a node's digest is always the one this
version's encoding of it gives.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any, NamedTuple, TypeVar, cast

import immutables
import zstandard

from .crc import crc32
from .errors import CorruptData
from .formats import ZSTD_LEVEL, no_gc, packb, packer, unpackb
from .namespace import EMPTY, Dir, File, Node

BLOCK_FORMAT = 2  # the format written; format 1 (one block per directory) is still read
DIGEST_SIZE = 32
KIND_DIR = 0
KIND_PART = 1
LEAF_BITS = 4  # a leaf sub-block holds 2**LEAF_BITS entries on average
FANOUT_BITS = 3  # an index sub-block (or a split directory's head) names 2**FANOUT_BITS on average
MAX_RUN = 512  # ... and at most this many (names that never hit a boundary)
MAX_DELTA = 256  # names a restored directory remembers as changed from the live one it edited (Dir.delta)
MIN_SPLIT = 1 << LEAF_BITS  # a directory of fewer entries is one block however its names hash
_BIG_ENDIAN = sys.byteorder == "big"
_HASH_MUL = 0x9E3779B1

VersionOf = Callable[[int], int]
Counts = tuple[int, int, int, int]  # files, directories, chunk references, logical bytes


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


def name_rank(name: str) -> int:
    """The leading zero bits of a mixed 32-bit hash of ``name``: a run of entries ends after a
    name whose rank reaches the level's threshold (see :func:`threshold`)."""
    return _ranks([name])[0]


def threshold(height: int) -> int:
    """The rank that ends a run at ``height`` (0: leaves); a boundary of one level is one of the
    levels below too."""
    return LEAF_BITS + height * FANOUT_BITS


def runs(ranks: list[int], height: int) -> list[int]:
    """The end indices (exclusive) of the runs a sequence splits into at ``height``: a run ends
    after an item whose rank reaches ``threshold(height)`` or when it holds MAX_RUN items; the
    last run ends at the end. A function of the sequence alone, so the same entries split the
    same way whatever history made them."""
    ends: list[int] = []
    start = 0
    n = len(ranks)
    t = threshold(height)
    for i, r in enumerate(ranks):
        if i + 1 < n and (r >= t or i + 1 - start >= MAX_RUN):
            ends.append(i + 1)
            start = i + 1
    ends.append(n)
    return ends


def _entries_block(kind: int, mode: int, mtime: int, items: list[tuple[str, Node]], version_of: VersionOf,
                   child_digest: Callable[[Dir], bytes], parts: bytes = b"") -> tuple[bytes, BlockInfo]:
    if not items:  # a head or index sub-block naming sub-blocks: every entry column is empty
        return (packb([BLOCK_FORMAT, kind, mode, mtime, b"", b"", b"", b"", b"", b"", b"", b"", b"", parts]),
                BlockInfo(_digests(parts), b""))
    nodes = [k for _n, k in items]
    files = [k for k in nodes if type(k) is File]
    kinds = bytes([0x66 if type(k) is File else 0x64 for k in nodes])
    handles = [h for f in files for h in f.chunks]
    dirs = b"".join([child_digest(k) for k in nodes if type(k) is Dir])
    names = "\x00".join([n for n, _k in items]).encode("utf-8")
    data = packb([BLOCK_FORMAT, kind, mode, mtime, names, kinds,
                  _pack([f.size for f in files]), _pack([f.mtime for f in files]),
                  _pack([f.mode for f in files]), _pack([len(f.chunks) for f in files]),
                  _pack(handles), _pack(list(map(version_of, handles))), dirs, parts])
    return data, BlockInfo(_digests(dirs + parts) if dirs or parts else (), array("q", handles).tobytes())


def _leaf_blocks(raw: list[bytes], nodes: list[Node], ends: list[int], version_of: VersionOf,
                 child_digest: Callable[[Dir], bytes]) -> tuple[list[tuple[bytes, BlockInfo]], Counts | None]:
    """The leaf sub-blocks of a directory's entries (``raw``: their names, UTF-8, in order;
    ``nodes``: their nodes) cut at ``ends``, each as :func:`_entries_block` makes it, byte for
    byte: every column is built once for the whole directory (a directory of files alone
    without the per-entry kinds and positions), and each leaf takes its slices. With the
    directory's counts (see :func:`stats`; None if a subdirectory has none yet), from the same
    columns."""
    n = len(nodes)
    types = list(map(type, nodes))
    files: list[Any]  # File nodes (checked by type below)
    subdirs: list[Any]
    if Dir not in types:  # files alone (the common case): no kinds or positions per entry
        files, subdirs = cast(list[Any], nodes), []
        kinds = b"f" * n
        fpos: Any = range(n + 1)
    else:
        files = [k for k, t in zip(nodes, types, strict=True) if t is File]
        subdirs = [k for k, t in zip(nodes, types, strict=True) if t is Dir]
        kinds = bytes([0x66 if t is File else 0x64 for t in types])
        fpos = [0, *accumulate([1 if t is File else 0 for t in types])]  # files before each entry
    dirs = b"".join([child_digest(k) for k in subdirs])
    chunks = [f.chunks for f in files]
    nch = list(map(len, chunks))
    handles = list(chain.from_iterable(chunks))
    sz = [f.size for f in files]
    counts = _sum_subdirs((len(files), 1, len(handles), sum(sz)), subdirs)
    col = f"<{len(files)}q"  # little-endian int64s, as _pack makes them
    sizes, mtimes = struct.pack(col, *sz), struct.pack(col, *[f.mtime for f in files])
    modes, nchunks = struct.pack(col, *[f.mode for f in files]), struct.pack(col, *nch)
    col = f"<{len(handles)}q"
    hb, vb = struct.pack(col, *handles), struct.pack(col, *map(version_of, handles))
    native = hb if not _BIG_ENDIAN else array("q", handles).tobytes()
    hpos = [0, *accumulate(nch)]  # handles before each file
    pack = packer()
    sep = b"\x00"
    out = []
    a = 0
    for b in ends:
        fa, fb = fpos[a], fpos[b]
        ha, hz = 8 * hpos[fa], 8 * hpos[fb]
        fa, fb = 8 * fa, 8 * fb
        if dirs:
            d = dirs[DIGEST_SIZE * (a - fpos[a]):DIGEST_SIZE * (b - fpos[b])]
            info = BlockInfo(_digests(d) if d else (), native[ha:hz])
        else:
            d = b""
            info = BlockInfo((), native[ha:hz])
        out.append((pack([BLOCK_FORMAT, KIND_PART, 0, 0, sep.join(raw[a:b]), kinds[a:b], sizes[fa:fb], mtimes[fa:fb],
                          modes[fa:fb], nchunks[fa:fb], hb[ha:hz], vb[ha:hz], d, b""]), info))
        a = b
    return out, counts


def _sum_subdirs(counts: Counts | None, subdirs: list[Dir]) -> Counts | None:
    """``counts`` plus the memoised counts of ``subdirs`` (None if one lacks them)."""
    for k in subdirs:
        if counts is None or k.stats is None:
            return None
        f2, d2, c2, s2 = k.stats
        counts = counts[0] + f2, counts[1] + d2, counts[2] + c2, counts[3] + s2
    return counts


class DirBlocks(NamedTuple):
    """A directory's encoded blocks: its head, its sub-blocks (digest, bytes) children before
    parents, for the head and each index sub-block the digests of the sub-blocks it names, and
    each block's info (by digest); a split directory's leaves' last names and digests."""
    head: bytes
    parts: list[tuple[bytes, bytes]]
    kids: dict[bytes, tuple[bytes, ...]]
    infos: dict[bytes, BlockInfo]
    lasts: tuple[str, ...] = ()  # a split directory's leaves' last names, in order
    whole: bool = True  # False: ``parts`` holds only the sub-blocks encoded anew (see _digest)
    leaves: tuple[bytes, ...] = ()  # a split directory's leaves' digests, in order (as ``lasts``)
    names: tuple[str, ...] = ()  # a split directory's names, in order (its next version's start from them)
    counts: Counts | None = None  # the directory's counts (see stats) if its encoding found them


def _encoded(names: list[str]) -> list[bytes]:
    """``names`` in UTF-8 (one encode and one split for the lot)."""
    raw = "\x00".join(names).encode("utf-8").split(b"\x00")
    if len(raw) != len(names):  # a name holding NUL (paths refuse them) or no names at all
        raw = [n.encode("utf-8") for n in names]
    return raw


def _rank(crc: int) -> int:
    """The rank (see :func:`name_rank`) of a name whose crc32 is ``crc``."""
    return 32 - ((crc * _HASH_MUL) & 0xFFFFFFFF).bit_length()


def _ranks(names: list[str]) -> list[int]:
    return list(map(_rank, map(crc32, _encoded(names))))


# a lane's low byte (see leaf_ends) -> 0 if its low threshold(0) bits are zero (a boundary), else 1
_BOUNDARY = bytes(0 if i & ((1 << LEAF_BITS) - 1) == 0 else 1 for i in range(256))
assert LEAF_BITS <= 8  # leaf_ends reads the bits of a boundary from one byte per lane


def leaf_ends(crcs: list[int]) -> list[int]:
    """``runs(ranks, 0)`` for names whose crc32s are ``crcs``, with Python work per boundary
    instead of per name: every crc times _HASH_MUL at once, as 64-bit lanes of one integer (no
    carry crosses a lane), and a name ends a run where the top threshold(0) of its product's
    low 32 bits are all zero (its rank reaches threshold(0))."""
    n = len(crcs)
    if not n:
        return [0]
    lanes = array("Q", crcs)
    if _BIG_ENDIAN:  # pragma: no cover
        lanes.byteswap()
    wide = int.from_bytes(lanes.tobytes(), "little") * _HASH_MUL
    # each lane's low byte now starts with its product's bits 32 - threshold(0) .. 31
    hits = (wide >> (32 - threshold(0))).to_bytes(8 * n + 8, "little")[::8].translate(_BOUNDARY)[:n]
    ends: list[int] = []
    start = 0
    i = hits.find(0)
    while i >= 0:
        while i + 1 - start > MAX_RUN:
            start += MAX_RUN
            ends.append(start)
        if i + 1 < n:
            ends.append(i + 1)
            start = i + 1
        i = hits.find(0, i + 1)
    while n - start > MAX_RUN:
        start += MAX_RUN
        ends.append(start)
    ends.append(n)
    return ends


class _Parts:
    """The sub-blocks made for one directory: (digest, bytes) children before parents, what each
    index sub-block names, and each one's info."""

    def __init__(self, version_of: VersionOf, child_digest: Callable[[Dir], bytes]) -> None:
        self.version_of = version_of
        self.child_digest = child_digest
        self.parts: list[tuple[bytes, bytes]] = []
        self.index: dict[bytes, tuple[bytes, ...]] = {}
        self.infos: dict[bytes, BlockInfo] = {}
        self.counts: Counts | None = None  # the directory's, from its leaves' columns

    def __call__(self, entries: list[tuple[str, Node]], named: list[bytes]) -> bytes:
        """A sub-block of ``entries`` (a leaf) or naming the sub-blocks ``named`` (an index)."""
        data, info = _entries_block(KIND_PART, 0, 0, entries, self.version_of, self.child_digest, b"".join(named))
        dg = block_digest(data)
        self.parts.append((dg, data))
        self.infos[dg] = info
        if named:
            self.index[dg] = tuple(named)
        return dg

    def leaves(self, raw: list[bytes], nodes: list[Node], ends: list[int]) -> list[bytes]:
        """The leaf sub-blocks of entries ``raw`` (names) and ``nodes`` cut at ``ends`` (see
        :func:`_leaf_blocks`)."""
        out = []
        blocks, self.counts = _leaf_blocks(raw, nodes, ends, self.version_of, self.child_digest)
        for data, info in blocks:
            dg = block_digest(data)
            self.parts.append((dg, data))
            self.infos[dg] = info
            out.append(dg)
        return out


def dir_blocks(d: Dir, version_of: VersionOf, child_digest: Callable[[Dir], bytes]) -> DirBlocks:
    """The canonical blocks of directory ``d`` (its children's digests from ``child_digest``):
    its head block (mode, mtime and either its entries or the digests of its top sub-blocks) and
    its sub-blocks, each level's before the next (children before parents).

    A directory of fewer than MIN_SPLIT entries, or whose entries form one run (see
    :func:`runs`), is one block. A bigger one is a tree of sub-blocks (a Prolly tree over its
    names): leaf parts hold runs of entries, index parts runs of the level below, until one run
    is left, which the head names. Boundaries depend only on the names, so changing an entry
    re-encodes its leaf and one index part per level, and inserting or removing one moves at
    most the boundaries around it."""
    ch = d.children
    names = sorted(ch)
    if len(names) < MIN_SPLIT:
        return _one_block(d, [(n, ch[n]) for n in names], version_of, child_digest)
    raw = _encoded(names)
    crcs = list(map(crc32, raw))
    ends = leaf_ends(crcs)
    if len(ends) == 1:
        return _one_block(d, [(n, ch[n]) for n in names], version_of, child_digest)
    part = _Parts(version_of, child_digest)
    parts, index, infos = part.parts, part.index, part.infos
    level = part.leaves(raw, list(map(ch.__getitem__, names)), ends)  # this level's digests
    leaves = tuple(level)
    head = _upper(d, level, [_rank(crcs[e - 1]) for e in ends], part, index, infos, version_of)
    return DirBlocks(head, parts, index, infos, tuple(names[e - 1] for e in ends), leaves=leaves, names=tuple(names),
                     counts=part.counts)


def _upper(d: Dir, level: list[bytes], level_ranks: list[int], part: Callable[[list[tuple[str, Node]], list[bytes]], bytes],
           index: dict[bytes, tuple[bytes, ...]], infos: dict[bytes, BlockInfo], version_of: VersionOf) -> bytes:
    """The index sub-blocks over the leaves ``level`` (a leaf's rank is that of its last name),
    made by ``part``, and the head naming the top run; returns the head."""
    height = 1
    while len(ends := runs(level_ranks, height)) > 1:
        starts = [0, *ends[:-1]]
        level = [part([], level[a:b]) for a, b in zip(starts, ends, strict=True)]
        level_ranks = [level_ranks[e - 1] for e in ends]
        height += 1
    head, info = _entries_block(KIND_DIR, d.mode, d.mtime, [], version_of, _no_dirs, b"".join(level))
    hd = block_digest(head)
    index[hd] = tuple(level)
    infos[hd] = info
    return head


def leaf_block(d: Dir, names: list[str], lasts: tuple[str, ...], i: int, want: bytes,
               version_of: VersionOf) -> bytes | None:
    """The bytes of split directory ``d``'s ``i``-th leaf (its names: after the previous leaf's
    last name up to its own; ``names``: ``d``'s names sorted, ``lasts``: each leaf's last name),
    None if they do not give the leaf's digest ``want``."""
    a = bisect.bisect_right(names, lasts[i - 1]) if i else 0
    ch = d.children
    data = _entries_block(KIND_PART, 0, 0, [(n, ch[n]) for n in names[a:bisect.bisect_right(names, lasts[i])]],
                          version_of, lambda c: digest(c, version_of))[0]
    return data if block_digest(data) == want else None


def _subdirs(d: Dir) -> list[Dir]:
    """``d``'s subdirectories (none to look for when its memoised counts say it has none)."""
    counts = d.stats
    if counts is not None and counts[1] == 1:
        return []
    return [k for k in d.children.values() if type(k) is Dir]


def _no_dirs(_d: Dir) -> bytes:  # pragma: no cover - a block naming sub-blocks has no entries
    raise AssertionError("no entries")


def _leaves(dg: bytes, kids: dict[bytes, tuple[bytes, ...]]) -> list[bytes]:
    """The leaf sub-blocks of split directory ``dg``, in name order."""
    out: list[bytes] = []
    stack = [dg]
    while stack:
        p = stack.pop()
        below = kids.get(p)
        if below is None:
            out.append(p)
        else:
            stack.extend(reversed(below))
    return out


def _dir_blocks_from(d: Dir, base: bytes, changed: frozenset[str], version_of: VersionOf,
                     child_digest: Callable[[Dir], bytes]) -> DirBlocks | None:
    """``d``'s blocks from those of an earlier version of it (head digest ``base``, its infos
    and leaves' last names cached) when only the entries named ``changed`` may differ: the
    leaves holding no changed name are taken as they are, the runs around the changed names are
    cut again (further, while a boundary moved) and encoded, the index sub-blocks and head
    rebuilt. None when there is nothing to start from (then encode it all). The result is not
    ``whole``: ``parts`` holds the leaves encoded here and the index sub-blocks."""
    lay = _INFOS.get(base)
    if lay is None or not lay[2]:
        return None
    binfos, bkids, lasts, old, _size, bnames = lay
    ch = d.children
    names = names_after(bnames, changed, ch) if bnames else sorted(ch.keys())
    n = len(names)
    if n < MIN_SPLIT or len(old) != len(lasts):
        return None
    nl = len(lasts)
    hit = sorted({min(bisect.bisect_left(lasts, c), nl - 1) for c in changed})
    part = _Parts(version_of, child_digest)
    parts, index, infos = part.parts, part.index, part.infos
    t0 = threshold(0)
    level: list[bytes] = []
    new_lasts: list[str] = []
    i = pos = h = 0
    while i < nl:
        if h < len(hit) and hit[h] == i:  # cut the runs from old leaf i on again
            j = i
            while True:
                e = n if j == nl - 1 else bisect.bisect_right(names, lasts[j])
                ends: list[int] = []
                start = pos
                for k, r in enumerate(_ranks(names[pos:e]), pos):
                    if (r >= t0 or k + 1 - start >= MAX_RUN) and k + 1 < n:
                        ends.append(k + 1)
                        start = k + 1
                if e == n or (ends and ends[-1] == e):
                    break
                j += 1  # the region's end is no boundary any more: the next leaf joins it
            if not ends or ends[-1] != e:
                ends.append(e)
            for a, b in zip([pos, *ends[:-1]], ends, strict=True):
                if a < b:
                    level.append(part([(nm, ch[nm]) for nm in names[a:b]], []))
                    new_lasts.append(names[b - 1])
            pos, i = e, j + 1
            while h < len(hit) and hit[h] <= j:
                h += 1
        else:  # as it was
            level.append(old[i])
            infos[old[i]] = binfos[old[i]]
            new_lasts.append(lasts[i])
            pos = bisect.bisect_right(names, lasts[i])
            i += 1
    if len(level) < 2:
        return None
    leaves = tuple(level)
    head = _upper(d, level, _ranks(new_lasts), part, index, infos, version_of)
    return DirBlocks(head, parts, index, infos, tuple(new_lasts), whole=False, leaves=leaves, names=tuple(names))


def names_after(before: tuple[str, ...], changed: frozenset[str], children: Mapping[str, object]) -> list[str]:
    """The names of ``children`` in order, from ``before`` (the names, in order, of a directory
    that differs from it only in the names ``changed``): each changed name inserted or removed
    where it falls, instead of sorting them all again."""
    names = list(before)
    for c in changed:
        i = bisect.bisect_left(names, c)
        there = i < len(names) and names[i] == c
        if c in children:
            if not there:
                names.insert(i, c)
        elif there:
            del names[i]
    return names


def _one_block(d: Dir, items: list[tuple[str, Node]], version_of: VersionOf,
               child_digest: Callable[[Dir], bytes]) -> DirBlocks:
    head, info = _entries_block(KIND_DIR, d.mode, d.mtime, items, version_of, child_digest)
    return DirBlocks(head, [], {}, {block_digest(head): info})


def older_block(data: bytes, old: Dir, version_of: VersionOf, subst: dict[bytes, bytes],
                held: Callable[[bytes], bool], sorted_names: dict[int, list[str]]) -> tuple[bytes, bytes] | None:
    """(digest, bytes) of the block ``old`` (the previous version of the directory block
    ``data`` belongs to) has at ``data``'s place, if ``held`` accepts its digest, else None.
    Guessed, cheapest first: ``data`` naming, for each directory and sub-block it names, the
    older digest ``subst`` has for it, with ``old``'s mode and mtime if a head; then, for a block
    of entries, ``old``'s entries in the same name range (those of ``data``'s names it has, then
    all of its names in that range). ``sorted_names``: ``old``'s names in order, by ``id(old)``,
    filled as needed."""
    raw = _raw(data)
    kind = raw[1]
    if kind == KIND_DIR or raw[12] or raw[13]:  # (a sub-block of files alone would be ``data`` again)
        if kind == KIND_DIR:
            raw[2], raw[3] = old.mode, old.mtime
        for col in (12, 13):
            if raw[col]:
                raw[col] = b"".join([subst.get(d, d) for d in _digests(raw[col])])
        guess = packb(raw)
        dg = block_digest(guess)
        if held(dg):
            return dg, guess
    if not raw[4]:
        return None
    ch = old.children
    mine = raw[4].decode("utf-8").split("\x00")
    tries = [[n for n in mine if n in ch]]
    if kind == KIND_DIR or len(tries[0]) < len(mine):
        names = sorted_names.get(id(old))
        if names is None:
            names = sorted_names[id(old)] = sorted(ch.keys())
        tries.append(names if kind == KIND_DIR else
                     names[bisect.bisect_left(names, mine[0]):bisect.bisect_right(names, mine[-1])])
    for span in tries:
        guess = _entries_block(kind, raw[2], raw[3], [(n, ch[n]) for n in span], version_of,
                               lambda c: digest(c, version_of))[0]
        dg = block_digest(guess)
        if held(dg):
            return dg, guess
    return None


# A directory's blocks as last encoded, by head digest (the same digest names the same bytes), so
# a snapshot encodes a changed directory once for its digest, its shipping and its commit op.
_CACHE: dict[bytes, DirBlocks] = {}
_CACHE_LIMIT = 32 << 20
_cache_bytes = 0
_cache_lock = threading.Lock()


# ... and their infos (by head digest; smaller, so kept for many more directories): a commit op
# names the new blocks' children and chunks without encoding them again; with what each head and
# index sub-block names, a split directory's leaves' last names and digests,
# its size as counted against the bound, and a split directory's names in order (a changed
# version of it inserts and removes its changed names there instead of sorting all of them)
_INFOS: dict[bytes, tuple[dict[bytes, BlockInfo], dict[bytes, tuple[bytes, ...]], tuple[str, ...], tuple[bytes, ...],
                          int, tuple[str, ...]]] = {}
_INFOS_LIMIT = 128 << 20
_infos_bytes = 0


def _info_size(infos: dict[bytes, BlockInfo]) -> int:
    return sum(64 + DIGEST_SIZE * len(i.children) + len(i.handles) for i in infos.values())


def _remember(dg: bytes, blocks: DirBlocks) -> None:
    global _cache_bytes, _infos_bytes
    size = len(blocks.head) + sum(len(b) for _p, b in blocks.parts)
    isize = _info_size(blocks.infos) + 8 * (len(blocks.lasts) + len(blocks.names))
    with _cache_lock:
        if dg not in _INFOS and isize <= _INFOS_LIMIT // 4:
            leaves = blocks.leaves if len(blocks.leaves) == len(blocks.lasts) else tuple(_leaves(dg, blocks.kids))
            _INFOS[dg] = (blocks.infos, blocks.kids, blocks.lasts, leaves, isize, blocks.names)
            _infos_bytes += isize
            while _infos_bytes > _INFOS_LIMIT:
                _infos_bytes -= _INFOS.pop(next(iter(_INFOS)))[4]
        had = _CACHE.get(dg)
        if (had is not None and (had.whole or not blocks.whole)) or size > _CACHE_LIMIT // 4:
            return
        if had is not None:
            del _CACHE[dg]
            _cache_bytes -= len(had.head) + sum(len(b) for _p, b in had.parts)
        _CACHE[dg] = blocks
        _cache_bytes += size
        while _cache_bytes > _CACHE_LIMIT:
            old = _CACHE.pop(next(iter(_CACHE)))
            _cache_bytes -= len(old.head) + sum(len(b) for _p, b in old.parts)


def infos_of_dir(d: Dir, version_of: VersionOf) -> tuple[dict[bytes, BlockInfo], dict[bytes, tuple[bytes, ...]]]:
    """``d``'s block infos and sub-block structure (cached; encoded again only when evicted)."""
    got = _INFOS.get(digest(d, version_of))
    if got is None:
        blocks = blocks_of_dir(d, version_of)
        return blocks.infos, blocks.kids
    return got[0], got[1]


# A caller's own record of the directories a digest pass encoded (by head digest), kept whole
# whatever the bounded cache evicts: a snapshot build ships them without encoding them again.
Kept = dict[bytes, DirBlocks]


def blocks_of_dir(d: Dir, version_of: VersionOf, kept: Kept | None = None, whole: bool = True) -> DirBlocks:
    """``d``'s blocks (from ``kept`` or the cache when it was encoded lately): all of them, or
    (not ``whole``) maybe only those its digest pass encoded anew (see :func:`_dir_blocks_from`;
    its ``kids``, ``infos`` and ``lasts`` are whole)."""
    dg = digest(d, version_of)
    got = kept.get(dg) if kept is not None else None
    if got is None or (whole and not got.whole):
        got = _CACHE.get(dg)
    if got is None and not whole:
        got = _from_infos(d, dg, version_of)
    if got is None or (whole and not got.whole):
        got = dir_blocks(d, version_of, lambda c: digest(c, version_of))
        _remember(dg, got)
    return got


def _from_infos(d: Dir, dg: bytes, version_of: VersionOf) -> DirBlocks | None:
    """Split directory ``d``'s (head digest ``dg``) head and index sub-blocks, made from its cached
    infos (what each names) without encoding its entries; its leaves are left out (not whole)."""
    lay = _INFOS.get(dg)
    if lay is None or not lay[2]:
        return None
    infos, kids, lasts, leaves, _size, names = lay
    head = _entries_block(KIND_DIR, d.mode, d.mtime, [], version_of, _no_dirs, b"".join(kids[dg]))[0]
    if block_digest(head) != dg:  # pragma: no cover - a stale entry
        return None
    parts: list[tuple[bytes, bytes]] = []

    def below(p: bytes) -> None:  # index sub-blocks, children before parents
        for c in kids[p]:
            if c in kids:
                below(c)
                parts.append((c, _entries_block(KIND_PART, 0, 0, [], version_of, _no_dirs, b"".join(kids[c]))[0]))

    below(dg)
    return DirBlocks(head, parts, kids, infos, lasts, whole=False, leaves=leaves, names=names)


def digest(d: Dir, version_of: VersionOf, kept: Kept | None = None) -> bytes:
    """``d``'s block digest, computed once per node (memoised on the immutable node); every
    directory this call encodes is also put in ``kept`` if given."""
    got = d.digest
    if got is not None:
        return got
    with no_gc():
        return _digest(d, version_of, kept)


def _digest(d: Dir, version_of: VersionOf, kept: Kept | None) -> bytes:
    got = d.digest
    if got is None:
        ch = d.children
        # read once: another digest pass of the same node (a restore's, a snapshot's) may run
        # in another thread and clear them; both compute the same
        base, changed = d.base, d.changed
        bdg = base.digest if base is not None else None
        # a derived directory's unchanged children are its base's, digested with it
        for k in ([ch.get(n) for n in changed] if bdg is not None and changed is not None else ch.values()):
            if type(k) is Dir:
                _digest(k, version_of, kept)
        counts = _derived_stats(d, base, changed) if base is not None and changed is not None else None
        blocks = None
        child = lambda c: _digest(c, version_of, kept)  # noqa: E731
        if bdg is not None and changed is not None:
            blocks = _dir_blocks_from(d, bdg, changed, version_of, child)
        if blocks is None:
            blocks = dir_blocks(d, version_of, child)
        if counts is None:
            counts = blocks.counts if blocks.counts is not None else _sum_stats(d)
        d.stats = counts
        d.base = d.changed = None
        if bdg is not None and changed is not None:
            d.delta = dl = (bdg, changed)
            d.far = _far(base, dl)
        got = block_digest(blocks.head)
        _remember(got, blocks)
        if kept is not None:
            kept[got] = blocks
        d.digest = got
    return got


def _far(base: Dir | None, delta: tuple[bytes, frozenset[str]]) -> tuple[bytes, frozenset[str]] | None:
    """A directory's ``Dir.far`` from its base's and its own ``delta`` against that base: the
    base's far anchor with the names changed since added (at most MAX_DELTA of them), else its
    delta (the base is its own anchor: marked shipped, or never given one)."""
    fa = base.far if base is not None else None  # (read once: a build may mark it meanwhile)
    if fa is None or fa[0] == delta[0]:
        return delta
    names = fa[1] | delta[1]
    return (fa[0], names) if len(names) <= MAX_DELTA else delta


def mark_shipped(dirs: Iterable[Dir]) -> None:
    """The directories (digested) of a snapshot's tree that its build shipped: each is its own
    far anchor (``Dir.far``), so the versions of it made later remember their changes from it,
    the version holders of that snapshot have, across the digests in between."""
    for d in dirs:
        dg = d.digest
        if dg is not None:
            d.far = (dg, frozenset())


def _derived_stats(d: Dir, base: Dir, changed: frozenset[str]) -> Counts | None:
    """``d``'s counts from its base's (see Dir.base), less the ``changed`` names' entries
    there, plus theirs here."""
    counts = base.stats
    bch, ch = base.children, d.children
    for name in changed:
        if (old := bch.get(name)) is not None:
            counts = _add(counts, old, -1)
        if (new := ch.get(name)) is not None:
            counts = _add(counts, new, 1)
    return counts


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
    entries: dict[str, Entry]  # in name order (a sub-block: its run of the directory's entries)
    parts: tuple[bytes, ...] = ()  # the sub-blocks holding the rest, in name order
    kind: int = KIND_DIR


def format_of(data: bytes) -> int:
    """The format number of a directory block's bytes (-1: not a block of a known layout), read
    from its first two bytes (a msgpack array of 12 or 14 fields starting with a small int)."""
    return data[1] if data[:1] in (b"\x9c", b"\x9e") and len(data) > 1 and data[1] < 0x80 else -1


def _raw(data: bytes) -> list[Any]:
    """A block's msgpack fields in format-2 order ``[fmt, kind, mode, mtime, names, kinds, sizes,
    mtimes, modes, nchunks, handles, versions, dirs, parts]`` (a format-1 block as a head
    without sub-blocks)."""
    raw = unpackb(data)
    if isinstance(raw, list) and len(raw) == 14 and raw[0] == BLOCK_FORMAT and raw[1] in (KIND_DIR, KIND_PART):
        out: list[Any] = raw
    elif isinstance(raw, list) and len(raw) == 12 and raw[0] == 1:
        out = [1, KIND_DIR, *raw[1:], b""]
    else:
        raise CorruptData("not a directory block of a known format")
    if not (isinstance(out[12], bytes) and isinstance(out[13], bytes)) or len(out[12]) % DIGEST_SIZE \
            or len(out[13]) % DIGEST_SIZE:
        raise CorruptData("bad digests in block")
    return out


def _digests(data: bytes) -> tuple[bytes, ...]:
    return tuple([data[i:i + DIGEST_SIZE] for i in range(0, len(data), DIGEST_SIZE)])


def decode_block(data: bytes, expected: bytes | None = None) -> Block:
    """A block from its bytes, verified against ``expected`` (its name) when given."""
    if expected is not None and block_digest(data) != expected:
        raise CorruptData("directory block does not match its digest")
    _fmt, kind, mode, mtime, names_b, kinds, *cols, dirs, parts_b = _raw(data)
    if not (isinstance(mode, int) and isinstance(mtime, int) and isinstance(names_b, bytes)
            and isinstance(kinds, bytes)):
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
    if names and parts_b:
        raise CorruptData("a block holds entries or names sub-blocks, not both")
    if kind == KIND_PART and not (names or parts_b):
        raise CorruptData("an empty sub-block")
    entries: dict[str, Entry] = {}
    fi = hi = di = 0
    for name, kch in zip(names, kinds, strict=True):
        if kch == 0x66:  # f
            k = nch[fi]
            entries[name] = FileEntry(sizes[fi], mtimes[fi], modes[fi], tuple(handles[hi:hi + k]),
                                      tuple(versions[hi:hi + k]))
            fi += 1
            hi += k
        else:
            entries[name] = DirRef(dirs[di:di + DIGEST_SIZE])
            di += DIGEST_SIZE
    return Block(mode, mtime, entries, _digests(parts_b), kind)


def block_of(d: Dir, version_of: VersionOf) -> Block:
    """The decoded block of a live directory, every entry in it (without encoding it; child
    digests memoised)."""
    entries: dict[str, Entry] = {}
    for name, k in sorted(d.children.items()):
        if type(k) is File:
            entries[name] = FileEntry(k.size, k.mtime, k.mode, k.chunks, tuple(version_of(h) for h in k.chunks))
        else:
            assert isinstance(k, Dir)
            entries[name] = DirRef(digest(k, version_of), k)
    return Block(d.mode, d.mtime, entries)


def child_digests(data: bytes) -> list[bytes]:
    """The digests of the blocks a block names: its directories', then its sub-blocks' (without
    building its entries)."""
    raw = _raw(data)
    return [*_digests(raw[12]), *_digests(raw[13])]


def block_chunks(data: bytes) -> list[int]:
    """The chunk handles a block's own files reference (one per reference)."""
    return _unpack(_raw(data)[10])


class Decoded(dict[bytes, Block]):
    """Blocks decoded (and verified) already, by digest; an assembly that asked for blocks keeps
    how far it got here, and the next run over the same blocks and live roots goes on from there
    (see :func:`assemble`)."""
    progress: Any = None


def _decoded(d: bytes, have: dict[bytes, bytes], memo: Decoded | None) -> Block:
    if memo is None:
        return decode_block(have[d], d)
    b = memo.get(d)
    if b is None:
        b = memo[d] = decode_block(have[d], d)
    return b


def missing_parts(dg: bytes, have: dict[bytes, bytes], memo: Decoded | None = None,
                  whole: set[bytes] | frozenset[bytes] = frozenset()) -> list[bytes]:
    """The blocks of directory ``dg`` (its head, its sub-blocks) not in ``have``, as far as the
    blocks in ``have`` tell (a missing index sub-block hides what is below it); below a block in
    ``whole`` (which is not missing either) nothing is missing."""
    missing: list[bytes] = []
    stack = [dg]
    while stack:
        d = stack.pop()
        if d in whole:
            continue
        if d not in have:
            missing.append(d)
        else:
            stack.extend(_decoded(d, have, memo).parts)
    return missing


def whole_dir(dg: bytes, have: dict[bytes, bytes], used: list[bytes] | None = None,
              memo: Decoded | None = None) -> Block:
    """Directory ``dg`` with all its entries, from its head and sub-blocks in ``have`` (each
    verified; ``used`` collects their digests; ``memo`` keeps what was decoded)."""
    head = _decoded(dg, have, memo)
    if head.kind != KIND_DIR:
        raise CorruptData(f"block {dg.hex()[:16]}… is a sub-block, not a directory")
    if used is not None:
        used.append(dg)
    if not head.parts:
        return head
    entries: dict[str, Entry] = {}
    last = ""
    stack = list(reversed(head.parts))
    while stack:
        d = stack.pop()
        b = _decoded(d, have, memo)
        if b.kind != KIND_PART:
            raise CorruptData(f"block {d.hex()[:16]}… is a directory, not a sub-block")
        if used is not None:
            used.append(d)
        if b.entries:
            first = next(iter(b.entries))
            if entries and first <= last:
                raise CorruptData("sub-blocks' names are not in order")
            entries.update(b.entries)
            last = next(reversed(b.entries))
        stack.extend(reversed(b.parts))
    return Block(head.mode, head.mtime, entries)


class TreeBlocks:
    """The blocks of a tree held in memory (e.g. a snapshot this master built), served by digest
    as a walk from its root asks for them: a block is served once its parent was."""

    def __init__(self, root: Dir, version_of: VersionOf) -> None:
        self.version_of = version_of
        self.nodes: dict[bytes, Dir] = {digest(root, version_of): root}
        self.parts: dict[bytes, bytes] = {}
        # a leaf not encoded yet: its directory, that directory's sorted names, its leaves' last names, its index
        self.leaves: dict[bytes, tuple[Dir, list[str], tuple[str, ...], int]] = {}

    def take(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """Those of ``digests`` this tree can give (the rest: read them elsewhere), with every
    sub-block of each directory given that is at hand (a leaf that is not is encoded when asked)."""
        out: dict[bytes, bytes] = {}
        for d in digests:
            part = self.parts.get(d)
            if part is None and d in self.leaves:
                part = leaf_block(*self.leaves[d], d, self.version_of)
            if part is not None:
                out[d] = part
                continue
            n = self.nodes.get(d)
            if n is None:
                continue
            blocks = blocks_of_dir(n, self.version_of, whole=False)
            if block_digest(blocks.head) != d:  # pragma: no cover - versions moved under the tree
                continue
            out[d] = blocks.head
            out.update(blocks.parts)  # all of them at once: the walk needs those it lacks next
            self.parts.update(blocks.parts)
            if not blocks.whole:
                names = sorted(n.children.keys())  # once per directory, not once per leaf asked for
                for i, leaf in enumerate(_leaves(d, blocks.kids)):
                    if leaf not in self.parts:
                        self.leaves[leaf] = (n, names, blocks.lasts, i)
            for k in _subdirs(n):
                self.nodes[digest(k, self.version_of)] = k
        return out


# --------------------------------------------------------------------------- walking trees


def iter_blocks(root: Dir, version_of: VersionOf, skip: Callable[[bytes], bool], kept: Kept | None = None,
                leaves: Mapping[bytes, bytes] | None = None) -> Iterator[tuple[bytes, bytes, Dir]]:
    """(digest, bytes, directory) of every block below and including ``root``'s (heads and
    sub-blocks) whose digest ``skip`` does not accept, children before their parents; a skipped
    block's subtree is not visited (a holder that has a block has everything it reaches), nor
    the unchanged entries of a directory whose base's block is skipped (see _changed_subdirs).
    ``kept``: directories encoded already (see :func:`digest`); ``leaves``: blocks at hand by
    digest (a leaf sub-block found there is not encoded again)."""
    out: list[tuple[bytes, bytes, Dir]] = []
    with no_gc():
        _collect(root, version_of, skip, out, set(), kept, leaves or {})
    yield from out


def _collect(d: Dir, version_of: VersionOf, skip: Callable[[bytes], bool],
             out: list[tuple[bytes, bytes, Dir]], seen: set[bytes], kept: Kept | None,
             leaves: Mapping[bytes, bytes]) -> None:
    dg = digest(d, version_of)
    if dg in seen or skip(dg):
        return
    seen.add(dg)
    for k in _changed_subdirs(d, skip):  # (one under a skipped sub-block is skipped by its own digest)
        _collect(k, version_of, skip, out, seen, kept, leaves)
    blocks = blocks_of_dir(d, version_of, kept, whole=False)
    wanted = _unskipped_parts(dg, blocks.kids, lambda p: p in seen or skip(p))
    parts = blocks.parts
    if not blocks.whole:
        lack = wanted.difference(p for p, _b in parts)
        if lack and all(p in leaves and p not in blocks.kids for p in lack):
            parts = [*((p, leaves[p]) for p in lack), *parts]  # leaves at hand, before what names them
        elif lack:
            parts = blocks_of_dir(d, version_of).parts  # a sub-block it did not encode anew is wanted
    for p, data in parts:
        if p in wanted:
            seen.add(p)
            out.append((p, data, d))
    out.append((dg, blocks.head, d))


def _changed_subdirs(d: Dir, skip: Callable[[bytes], bool]) -> list[Dir]:
    """The subdirectories of ``d`` to visit for blocks ``skip`` does not accept: when ``d`` is
    known to be a directory plus changes to a few names (``Dir.delta``, else ``Dir.far``) and
    ``skip`` accepts that directory's block, only those names' (every other entry is that
    directory's, so its block reaches them and they are skipped too); else all of them."""
    dl = d.delta
    if dl is not None and skip(dl[0]):
        ch = d.children
        return [k for k in (ch.get(n) for n in dl[1]) if type(k) is Dir]
    fa = d.far  # (a delta against a version digested ahead: the one its last snapshot shipped)
    if fa is not None and fa is not dl and skip(fa[0]):
        ch = d.children
        return [k for k in (ch.get(n) for n in fa[1]) if type(k) is Dir]
    return _subdirs(d)


def _unskipped_parts(dg: bytes, kids: dict[bytes, tuple[bytes, ...]], skip: Callable[[bytes], bool]) -> set[bytes]:
    """The sub-blocks of directory ``dg`` (``kids``: what its head and index sub-blocks name) not
    below one ``skip`` accepts (top down from the head)."""
    want: set[bytes] = set()
    stack = list(kids.get(dg, ()))
    while stack:
        p = stack.pop()
        if p in want or skip(p):
            continue
        want.add(p)
        stack.extend(kids.get(p, ()))
    return want


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


_zstd = threading.local()  # a (de)compressor per thread: making one costs ~15x a small block's work


def _compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    cs: dict[int, zstandard.ZstdCompressor] | None = getattr(_zstd, "c", None)
    if cs is None:
        cs = _zstd.c = {}
    c = cs.get(level)
    if c is None:
        c = cs[level] = zstandard.ZstdCompressor(level=level)
    return c


def compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    out: bytes = _compressor(level).compress(data)
    return out


def compress_many(blocks: list[bytes], level: int = ZSTD_LEVEL) -> list[bytes]:
    """Each of ``blocks`` as :func:`compress` makes it (at ``level``), in one call that lets the interpreter
    lock go once for them all: block by block, a thread takes the lock back after every block,
    and beside a busy Python thread (the loop, another worker) each take waits for that
    thread's switch interval (a batch of 8,000 small blocks: ~25 ms alone, ~150 ms so)."""
    c = _compressor(level)
    if not any(blocks):  # (zstandard refuses a call with no bytes at all)
        return [c.compress(b) for b in blocks]
    try:
        got = c.multi_compress_to_buffer(cast(list[bytes | bytearray | memoryview], blocks), threads=0)
    except NotImplementedError:  # pragma: no cover - zstandard's cffi backend lacks it
        return [c.compress(b) for b in blocks]
    return [got[i].tobytes() for i in range(len(got))]


def decompress(data: bytes) -> bytes:
    d = getattr(_zstd, "d", None)
    if d is None:
        d = _zstd.d = zstandard.ZstdDecompressor()
    try:
        out: bytes = d.decompress(data, max_output_size=MAX_BLOCK)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"bad compressed block: {exc}") from exc
    return out


def pack_frames(items: list[tuple[bytes, bytes]], compressed: bool = False) -> bytes:
    """Blocks on the wire (and in a chunkserver's packs): ``(<digest 32><u32 length><zstd(bytes)>)*``;
    ``compressed``: the items are compressed already."""
    out: list[bytes] = []
    for dg, data in items:
        if len(dg) != DIGEST_SIZE:
            raise ValueError("digest must be 32 bytes")
        z = data if compressed else compress(data)
        out += (dg, len(z).to_bytes(4, "little"), z)
    return b"".join(out)


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


_Item = TypeVar("_Item", bound=tuple[Any, ...])


def batches(items: list[_Item], limit: int, size_of: Callable[[_Item], int] | None = None) -> Iterator[list[_Item]]:
    """``items`` ((digest, bytes, ...)) in consecutive groups of at most ``limit`` bytes (one
    oversized block alone); ``size_of``: an item's bytes, if not ``len(item[1])``."""
    cur: list[_Item] = []
    size = 0
    for it in items:
        n = (len(it[1]) if size_of is None else size_of(it)) + _FRAME_HEAD
        if cur and size + n > limit:
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += n
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
    """The blocks below ``root`` (heads and sub-blocks) that ``known`` does not accept (every
    block a known block reaches is known too, so a known subtree is not visited, nor the
    unchanged entries of a directory whose base's block is known: see _changed_subdirs)."""
    out: dict[bytes, BlockInfo] = {}
    stack = [root]
    with no_gc():
        while stack:
            d = stack.pop()
            dg = digest(d, version_of)
            if dg in out or known(dg):
                continue
            infos, kids = infos_of_dir(d, version_of)
            out[dg] = infos[dg]
            for p in _unskipped_parts(dg, kids, lambda p: p in out or known(p)):
                out[p] = infos[p]
            stack.extend(_changed_subdirs(d, known))
    return out


# --------------------------------------------------------------------------- restore assembly


class NeedBlocks(Exception):
    """A restore needs blocks that were not supplied (fetch them and run again)."""

    def __init__(self, digests: list[bytes]) -> None:
        super().__init__(f"{len(digests)} directory blocks needed")
        self.digests = digests


def assemble(root: bytes, have: dict[bytes, bytes], live: list[Node | None], version_of: VersionOf,
             reused: list[tuple[tuple[str, ...], Dir]] | None = None, memo: Decoded | None = None
             ) -> tuple[Dir, list[bytes]]:
    """The tree named by ``root``: a directory whose digest equals a live candidate's at the same
    place (``live``: roots compared with ``root``, e.g. the restore target and the snapshot's
    original path) is that live node, reused as it is; any other comes from its block in
    ``have``. Returns the tree and the digests of the blocks it decoded. Raises
    :class:`NeedBlocks` naming every missing block of the first level that lacks some (so a
    caller fetches level by level, only where the live tree differs). ``reused`` collects each
    live directory reused, with its path relative to the candidates' roots.

    A directory rebuilt from its blocks takes the sub-blocks it shares with the live candidate
    at its place from that candidate (re-encoded, not fetched), so undoing one change in a big
    directory reads its head and the sub-blocks on the change's path; such a candidate is in
    ``reused`` too (the assembly depends on it). ``memo``: blocks decoded by an earlier run over
    the same ``have`` (a caller that fetches and runs again passes the same dict)."""
    with no_gc():
        return _assemble(root, have, live, version_of, reused if reused is not None else [], memo)


# An assembly's progress: directories built (by slot), blocks used, live directories whose
# sub-blocks are in the pool, those sub-blocks' digests, per slot the live directory there with
# sub-blocks and its leaves (edited, not read: see _edit_live), the pool of blocks (``have`` and
# those sub-blocks), each slot's path, the level to do (slot, digest, live candidates at this
# place), decoded blocks waiting for their children (with the live entries they edit), the next
# slot, and the live directories reused so far.
_Progress = tuple[dict[int, Dir], list[bytes], set[int], set[bytes], dict[int, tuple[Dir, DirBlocks]],
                  dict[int, set[bytes]], dict[bytes, bytes], dict[int, tuple[str, ...]],
                  list[tuple[int, bytes, list[Dir]]], list[tuple[int, Block, dict[str, int], bytes, Any]], int,
                  list[tuple[tuple[str, ...], Dir]]]


def _assemble(root: bytes, have: dict[bytes, bytes], live: list[Node | None], version_of: VersionOf,
              reused: list[tuple[tuple[str, ...], Dir]], memo: Decoded | None) -> tuple[Dir, list[bytes]]:
    key = (root, id(have), [id(c) for c in live])
    got = memo.progress if isinstance(memo, Decoded) else None
    resumed = got is not None and got[0] == key  # the run that asked for blocks goes on
    state: _Progress = got[1] if got is not None and resumed else (
        {}, [], set(), set(), {}, {}, have, {0: ()}, [(0, root, [c for c in live if isinstance(c, Dir)])], [], 1, [])
    built, used, sourced, from_live, base, shared, pool, where, level, pending, slot, found = state
    if resumed and pool is not have:
        pool.update(have)
    if isinstance(memo, Decoded):
        memo.progress = None
    reused_here, reused = reused, found
    while level:
        missing = []
        for _s, dg, cands in level:
            if not any(digest(c, version_of) == dg for c in cands):
                for c in cands:  # a changed directory's unchanged sub-blocks come from the live one
                    if id(c) not in sourced:
                        sourced.add(id(c))
                        cb = blocks_of_dir(c, version_of, whole=False)
                        if cb.kids:
                            pool = dict(have) if pool is have else pool
                            pool.update(cb.parts)
                            from_live.update(p for p, _b in cb.parts)
                            reused.append((where[_s], c))
                            if _s not in base:
                                base[_s] = (c, cb)
                                shared[_s] = set(_leaves(digest(c, version_of), cb.kids))
                missing += missing_parts(dg, pool, memo, from_live | shared.get(_s, set()))
        if missing:
            if isinstance(memo, Decoded):
                memo.progress = (key, (built, used, sourced, from_live, base, shared, pool, where, level,
                                       pending, slot, found))
            raise NeedBlocks(sorted(set(missing)))
        nxt: list[tuple[int, bytes, list[Dir]]] = []
        for s, dg, cands in level:
            reuse = next((c for c in cands if digest(c, version_of) == dg), None)
            if reuse is not None:
                built[s] = reuse
                reused.append((where[s], reuse))
                continue
            edit = None
            if s in base and _decoded(dg, pool, memo).parts:
                block, edit = _edit_live(dg, base[s][0], base[s][1], pool, used, memo)
            else:
                block = whole_dir(dg, pool, used, memo)
            kids: dict[str, int] = {}
            for name, e in block.entries.items():
                if isinstance(e, DirRef):
                    kc = [x for x in (c.children.get(name) for c in cands) if isinstance(x, Dir)]
                    kids[name] = slot
                    where[slot] = where[s] + (name,)
                    nxt.append((slot, e.digest, kc))
                    slot += 1
            pending.append((s, block, kids, dg, edit))
        level = nxt
    for s, block, kids, dg, edit in reversed(pending):  # children were numbered after their parents
        if edit is None:
            d = build_dir(block, lambda name, _ref, kids=kids: built[kids[name]])  # type: ignore[misc]
            counts = None
        else:  # the live directory's counts, less what went, plus what came
            mut, lv, removed = edit
            lch = lv.children
            counts = lv.stats
            for name in removed:
                counts = _add(counts, lch[name], -1)
            for name, e in block.entries.items():
                node = File(e.size, e.mtime, e.mode, e.chunks) if isinstance(e, FileEntry) else built[kids[name]]
                if name not in removed and name in lch:
                    counts = _add(counts, lch[name], -1)
                counts = _add(counts, node, 1)
                mut[name] = node
            d = Dir(mut.finish(), block.mtime, block.mode)
            touched = removed.union(block.entries)
            if lv.digest is not None and len(touched) <= MAX_DELTA:
                d.delta = (lv.digest, frozenset(touched))  # the live directory but for these
        _memoise(d, dg, counts, format_of(pool.get(dg, b"")) == BLOCK_FORMAT)
        built[s] = d
    reused_here.extend(found)
    return built[0], [d for d in dict.fromkeys(used) if d in have and d not in from_live]


def _edit_live(dg: bytes, live: Dir, lb: DirBlocks, pool: dict[bytes, bytes], used: list[bytes],
               memo: Decoded | None) -> tuple[Block, Any]:
    """Directory ``dg`` as an edit of the live directory ``live`` at its place (blocks ``lb``):
    a leaf sub-block both have holds the same entries on both sides, so only the leaves ``dg``
    does not share are read. Returns ``dg``'s mode and mtime with the entries of its unshared
    leaves, and ``live``'s entries (a mutation) without those of the leaves ``dg`` lacks."""
    head = _decoded(dg, pool, memo)
    if head.kind != KIND_DIR:
        raise CorruptData(f"block {dg.hex()[:16]}… is a sub-block, not a directory")
    used.append(dg)
    order = _leaves(live.digest or b"", lb.kids)
    live_leaves = set(order)
    mine: set[bytes] = set()
    entries: dict[str, Entry] = {}
    stack = list(head.parts)
    while stack:
        p = stack.pop()
        if p in live_leaves:
            mine.add(p)
            continue
        if p in lb.kids:  # an index sub-block both have: every leaf below it is shared
            stack.extend(lb.kids[p])
            continue
        b = _decoded(p, pool, memo)
        if b.kind != KIND_PART:
            raise CorruptData(f"block {p.hex()[:16]}… is a directory, not a sub-block")
        used.append(p)
        entries.update(b.entries)
        stack.extend(b.parts)
    edit = live.children.mutate()
    gone = live_leaves - mine
    removed: set[str] = set()
    if gone:  # a leaf's names are those after the previous leaf's last name up to its own
        names = sorted(live.children.keys())
        for i, p in enumerate(order):
            if p in gone:
                a = bisect.bisect_right(names, lb.lasts[i - 1]) if i else 0
                removed.update(names[a:bisect.bisect_right(names, lb.lasts[i])])
        for name in removed:
            del edit[name]
    return Block(head.mode, head.mtime, entries), (edit, live, removed)


def _add(counts: Counts | None, k: Node, sign: int) -> Counts | None:
    """``counts`` (see :func:`stats`) with node ``k``'s added (``sign`` 1) or taken away (-1)."""
    if counts is None:
        return None
    if type(k) is File:
        return counts[0] + sign, counts[1], counts[2] + sign * len(k.chunks), counts[3] + sign * k.size
    assert isinstance(k, Dir)
    if k.stats is None:
        return None
    f, d, c, b = k.stats
    return counts[0] + sign * f, counts[1] + sign * d, counts[2] + sign * c, counts[3] + sign * b


def _memoise(d: Dir, dg: bytes, counts: Counts | None = None, current: bool = True) -> None:
    """Give a directory built from block ``dg`` its digest and counts (``counts``, or from its
    children's, which have theirs), so the next snapshot or diff of the restored tree does not
    encode it again. Not its digest unless ``current`` (``dg`` is in BLOCK_FORMAT): a memoised
    digest must be the one encoding the node gives, since its blocks are looked up, encoded and
    shipped by it (a format-1 digest over format-2 blocks: a restore in place over the node
    took its head for its only leaf and kept entries it had to remove); a directory restored
    from an older format's blocks is encoded afresh when first digested."""
    if counts is None:
        counts = _sum_stats(d)
    if counts is not None:
        d.stats = counts
        if current:
            d.digest = dg
