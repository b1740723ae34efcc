"""Content-addressed directory blocks on a chunkserver (the blocks format-3 snapshot records reach).

A block's name is the sha256 of its bytes: it is checked on receipt (a put whose bytes do not
match is refused whole) and on every read (a block that no longer matches is dropped and reported
to the master, which re-ships it or fetches another copy).

Layout: ``<data>/blocks/<16 hex digits>.pack``, one pack per put (``KGBLKPK1`` then the
frames as they came, ``(<digest 32><u32 length><zstd(bytes)>)*``, see merkle.pack_frames; blocks
that came as deltas against blocks held here, see blockdelta, are stored whole like the others,
compressed at zstd level STORE_LEVEL, which takes half the time of the shipping level for ~8%
more bytes),
written tmp + fsync + rename + fsync of the directory, so
a put of many blocks costs one fsync and a pack is whole or absent. An in-memory index maps a
digest to (pack, offset, length); a pack is unlinked once none of its blocks is wanted. A block
deleted from a pack that still holds others comes back after a restart and is then reported in
the full heartbeat, where the master orders it deleted again (deletions are idempotent).

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
        self.live: dict[str, int] = {}  # pack name -> blocks of it in the index
        self.dropped: set[bytes] = set()  # failed their digest since the last heartbeat
        self.recent = BlockCache(cache_bytes)  # verified blocks, whole, stored or read lately
        self._lock = threading.Lock()
        self._seq = 0
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        for p in sorted(self.dir.glob("*.pack")):
            self._load(p)

    def _load(self, p: Path) -> None:
        data = p.read_bytes()
        try:
            self._seq = max(self._seq, int(p.stem, 16))
        except ValueError:
            log.error("ignoring block pack with a foreign name: %s", p.name)
            return
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
            self._seq += 1
            name = f"{self._seq:016x}.pack"
            tmp = self.dir / (name + ".tmp")
            parts = [PACK_MAGIC]
            where: list[tuple[str, int, int]] = []
            off = len(PACK_MAGIC) + _HEAD
            for dg, data in new.items():
                ln = len(data)
                parts += (dg, ln.to_bytes(4, "little"), data)
                where.append((name, off, ln))
                off += ln + _HEAD
            with open(tmp, "wb") as f:
                f.write(b"".join(parts))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.index.update(zip(new, where, strict=True))
            self.by_prefix.update({dg[:PREFIX]: dg for dg in new})
            self.live[name] = len(new)
            return len(new)

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
            fd = fds[name] = os.open(self.dir / name, os.O_RDONLY)
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
            for dg in digests:
                if dg in self.index:
                    self._forget(dg)
                    n += 1
        return n

    def _forget(self, dg: bytes) -> None:
        name, _off, _ln = self.index.pop(dg)
        self.recent.discard(dg)
        if self.by_prefix.get(dg[:PREFIX]) == dg:
            del self.by_prefix[dg[:PREFIX]]
        left = self.live.get(name, 1) - 1
        if left > 0:
            self.live[name] = left
            return
        self.live.pop(name, None)
        (self.dir / name).unlink(missing_ok=True)

    def digests(self) -> list[bytes]:
        return list(self.index)

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.pack"))


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
