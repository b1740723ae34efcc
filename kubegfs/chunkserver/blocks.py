"""Content-addressed directory blocks on a chunkserver (the blocks format-3 snapshot records reach).

A block's name is the sha256 of its bytes: it is checked on receipt (a put whose bytes do not
match is refused whole) and on every read (a block that no longer matches is dropped and reported
to the master, which re-ships it or fetches another copy).

Layout: ``<data>/blocks/<16 hex digits>.log``, the segments of the block log (blocklog.py): a put
is one entry appended to the head segment and made durable by one ``fdatasync`` (no file
created, renamed or directory fsynced per put), and is whole or absent after a crash. Blocks that
came as deltas against blocks held here (see blockdelta) are stored whole like the others,
compressed at zstd level STORE_LEVEL, which takes half the time of the shipping level for ~8%
more bytes. Still read, never written: ``<data>/blocks/<16 hex digits>.pack``, one pack per put
(``KGBLKPK1`` then the frames as they came, ``(<digest 32><u32 length><zstd(bytes)>)*``, see
merkle.pack_frames), which earlier versions wrote tmp + fsync + rename + fsync of the directory.

An in-memory index maps a digest to (pack or segment, offset, length). A pack or segment is
unlinked once none of its blocks is wanted, and a segment other than the head is compacted (its
wanted blocks appended to the head, then it is unlinked) once less than a quarter of its bytes
are wanted. A block deleted from a file that still holds others comes back after a restart and
is then reported in the full heartbeat, where the master orders it deleted again (deletions are
idempotent).

The blocks stored or read lately are also kept whole in memory (blockcache: verified when they
entered it), so a delta's base is mostly not read from its pack, decompressed and hashed again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..blockdelta import PREFIX, unpack
from ..errors import CorruptData
from ..merkle import DIGEST_SIZE, compress_many, verified
from . import blocklog
from .blockcache import DEFAULT_BYTES, BlockCache

log = logging.getLogger("kubegfs.chunkserver.blocks")

PACK_MAGIC = b"KGBLKPK1"
_HEAD = DIGEST_SIZE + 4
STORE_LEVEL = -1  # zstd level of the blocks rebuilt from deltas (3.4 µs a ~1 KB block against 7 µs at level 1)


def store_compress(blocks: list[bytes]) -> list[bytes]:
    """The blocks rebuilt from deltas as stored, at STORE_LEVEL, in one call (see merkle.compress_many)."""
    return compress_many(blocks, STORE_LEVEL)


class BlockStore:
    def __init__(self, root: Path, cache_bytes: int = DEFAULT_BYTES) -> None:
        self.dir = root / "blocks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[str, int, int]] = {}
        self.by_prefix: dict[bytes, bytes] = {}  # a digest's first PREFIX bytes -> digest (delta bases)
        self.live: dict[str, int] = {}  # pack or segment name -> blocks of it in the index
        self.sizes: dict[str, int] = {}  # segment name -> its bytes
        self.wanted: dict[str, int] = {}  # segment name -> bytes of the frames of its blocks in the index
        self.dropped: set[bytes] = set()  # failed their digest since the last heartbeat
        self.recent = BlockCache(cache_bytes)  # verified blocks, whole, stored or read lately
        self._lock = threading.Lock()
        seq = 0
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        files: list[tuple[int, Path]] = []
        for p in [*self.dir.glob("*.pack"), *self.dir.glob("*.log")]:
            try:
                files.append((int(p.stem, 16), p))
            except ValueError:
                log.error("ignoring a block file with a foreign name: %s", p.name)
        files.sort()
        for n, p in files:
            seq = max(seq, n)
            if p.suffix == ".pack":
                self._load(p)
            else:
                self._load_segment(p, p == files[-1][1])
        self.head = blocklog.Head(self.dir, seq)

    def _load(self, p: Path) -> None:
        data = p.read_bytes()
        if data[:8] != PACK_MAGIC:
            log.error("block pack %s has a bad magic; ignored", p.name)
            return
        pos, n = 8, 0
        while pos < len(data):
            if len(data) - pos < _HEAD:
                log.error("block pack %s is truncated at byte %d", p.name, pos)
                break
            dg = data[pos:pos + DIGEST_SIZE]
            ln = int.from_bytes(data[pos + DIGEST_SIZE:pos + _HEAD], "little")
            if pos + _HEAD + ln > len(data):
                log.error("block pack %s is truncated at byte %d", p.name, pos)
                break
            if dg not in self.index:
                self.index[dg] = (p.name, pos + _HEAD, ln)
                self.by_prefix[dg[:PREFIX]] = dg
                n += 1
            pos += _HEAD + ln
        if n:
            self.live[p.name] = n
        else:
            p.unlink()

    def _load_segment(self, p: Path, newest: bool) -> None:
        data = p.read_bytes()
        if data[:len(blocklog.SEGMENT_MAGIC)] != blocklog.SEGMENT_MAGIC:
            log.error("block log segment %s has a bad magic; ignored", p.name)
            return
        n = wanted = 0
        for _at, _ln, blocks in blocklog.scan(data, p.name, newest):
            for dg, off, ln in blocks:
                if dg not in self.index:
                    self.index[dg] = (p.name, off, ln)
                    self.by_prefix[dg[:PREFIX]] = dg
                    n += 1
                    wanted += ln + _HEAD
        if n:
            self.live[p.name] = n
            self.sizes[p.name] = len(data)
            self.wanted[p.name] = wanted
        else:
            p.unlink()

    def missing(self, digests: list[bytes]) -> list[bytes]:
        return [d for d in digests if d not in self.index]

    def put(self, items: list[tuple[bytes, bytes]]) -> int:
        """Store compressed blocks (as framed on the wire), each verified against its digest
        first (all or nothing); returns how many were new."""
        whole: list[tuple[bytes, bytes]] = []
        for dg, z in items:
            if len(dg) != DIGEST_SIZE:
                raise CorruptData("a block digest is 32 bytes")
            whole.append((dg, verified(dg, z)))
        n = self._store(items)
        self.recent.add(whole)
        return n

    def put_delta(self, body: bytes) -> tuple[int, int]:
        """Store a batch of blocks sent as deltas against blocks held here (see blockdelta), each
        rebuilt and checked first (all or nothing; a missing base raises MissingBase); returns
        (blocks in the batch, how many were new)."""
        fds: dict[str, int] = {}
        by_prefix, index, recent = self.by_prefix.get, self.index, self.recent.get

        def base_of(prefix: bytes) -> bytes | None:
            dg = by_prefix(prefix)
            if dg is None or dg not in index:
                return None
            blk = recent(dg)
            return blk if blk is not None else self._base(dg, fds)

        try:
            got = unpack(body, base_of)
        finally:
            _close(fds)
        zs = iter(store_compress([blk for _dg, blk, z in got if z is None]))
        n = self._store([(dg, z if z is not None else next(zs)) for dg, _blk, z in got])
        self.recent.add([(dg, blk) for dg, blk, _z in got])
        return len(got), n

    def _base(self, dg: bytes, fds: dict[str, int]) -> bytes | None:
        """Block ``dg``, held here but not among the recent ones, read from its pack (verified)
        and kept among them; None if it cannot be read whole."""
        try:
            blk = self._read(dg, fds)[1]
        except (KeyError, OSError, CorruptData):
            return None
        self.recent.add([(dg, blk)])
        return blk

    def _store(self, items: list[tuple[bytes, bytes]]) -> int:
        with self._lock:
            new: dict[bytes, bytes] = {}
            for dg, data in items:
                if dg not in self.index:
                    new[dg] = data
            if not new:
                return 0
            self._append(list(new.items()))
            return len(new)

    def _append(self, items: list[tuple[bytes, bytes]]) -> None:
        """Append blocks (not in the index, or in a segment being compacted) to the block log as
        one entry, durably, and index them there (caller holds the lock)."""
        payload, where = blocklog.frames(items)
        prev = self.head.name
        name, at = self.head.append(blocklog.entry(payload))
        base = at + blocklog.ENTRY_HEAD
        moved = [old for dg, _z in items if (old := self.index.get(dg)) is not None]  # compaction's
        self.index.update({dg: (name, base + off, len(z)) for (dg, z), off in zip(items, where, strict=True)})
        for old in moved:
            self._unwant(old)
        self.by_prefix.update({dg[:PREFIX]: dg for dg, _z in items})
        self.live[name] = self.live.get(name, 0) + len(items)
        self.wanted[name] = self.wanted.get(name, 0) + len(payload)
        self.sizes[name] = self.head.size
        if prev and prev != name:  # the previous head, sealed now, may be all or mostly unwanted
            if prev not in self.live:
                self._unlink(prev)
            else:
                self._compact_if_sparse(prev)

    def _unlink(self, name: str) -> None:
        self.sizes.pop(name, None)
        self.wanted.pop(name, None)
        (self.dir / name).unlink(missing_ok=True)

    def get(self, digests: list[bytes], remember: bool = True) -> list[tuple[bytes, bytes]]:
        """The blocks, compressed as stored, each verified; a missing one raises KeyError
        (named), a damaged one is dropped from the index and raises CorruptData. ``remember``:
        keep them in the cache of recent blocks (not for a scrub's pass over every block)."""
        out: list[tuple[bytes, bytes]] = []
        whole: list[tuple[bytes, bytes]] = []
        fds: dict[str, int] = {}
        try:
            for dg in digests:
                data, blk = self._read(dg, fds)
                out.append((dg, data))
                whole.append((dg, blk))
        finally:
            _close(fds)
        if remember:
            self.recent.add(whole)
        return out

    def _read(self, dg: bytes, fds: dict[str, int]) -> tuple[bytes, bytes]:
        """(compressed, block) of ``dg``, verified; a damaged one is dropped and reported.
        ``fds``: the packs opened so far by the caller (it closes them)."""
        where = self.index.get(dg)
        if where is None:
            raise KeyError(dg.hex())
        name, off, ln = where
        fd = fds.get(name)
        if fd is None:
            try:
                fd = fds[name] = os.open(self.dir / name, os.O_RDONLY)
            except FileNotFoundError:  # compacted since the index was read: read where it went
                if self.index.get(dg, where) == where:
                    raise
                return self._read(dg, fds)
        data = os.pread(fd, ln, off)
        try:
            blk = verified(dg, data)
        except CorruptData:
            log.error("block %s in %s failed its digest; dropped", dg.hex(), name)
            self._forget(dg)
            self.dropped.add(dg)
            raise CorruptData(f"block {dg.hex()[:16]}… failed its digest") from None
        return data, blk

    def delete(self, digests: list[bytes]) -> int:
        n = 0
        with self._lock:
            touched: set[str] = set()
            for dg in digests:
                where = self.index.get(dg)
                if where is not None:
                    self._forget(dg)
                    touched.add(where[0])
                    n += 1
            for name in sorted(touched):
                self._compact_if_sparse(name)
        return n

    def _forget(self, dg: bytes) -> None:
        where = self.index.pop(dg)
        self.recent.discard(dg)
        if self.by_prefix.get(dg[:PREFIX]) == dg:
            del self.by_prefix[dg[:PREFIX]]
        self._unwant(where)

    def _unwant(self, where: tuple[str, int, int]) -> None:
        """A block's copy at ``where`` is no longer indexed: its file is unlinked if it was the
        last one wanted there (never the head segment)."""
        name, _off, ln = where
        if name in self.wanted:
            self.wanted[name] -= ln + _HEAD
        left = self.live.get(name, 1) - 1
        if left > 0:
            self.live[name] = left
            return
        self.live.pop(name, None)
        if name != self.head.name:
            self._unlink(name)

    def _compact_if_sparse(self, name: str) -> None:
        """A segment other than the head with less than a quarter of its bytes wanted: its wanted
        blocks appended to the head as one entry (durable), then the segment unlinked (caller
        holds the lock). A crash in between leaves both copies, each whole."""
        size = self.sizes.get(name)
        if size is None or name == self.head.name or self.wanted.get(name, 0) * 4 >= size:
            return
        keep = [(dg, off, ln) for dg, (n, off, ln) in self.index.items() if n == name]
        with open(self.dir / name, "rb") as f:
            items = [(dg, os.pread(f.fileno(), ln, off)) for dg, off, ln in keep]
        if items:
            self._append(items)  # the segment's last block moved unlinks it
        log.info("compacted block log segment %s: %d blocks moved to %s", name, len(items), self.head.name)

    def digests(self) -> list[bytes]:
        return list(self.index)

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in [*self.dir.glob("*.pack"), *self.dir.glob("*.log")])


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
