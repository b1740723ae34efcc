"""Content-addressed directory blocks on a chunkserver (the blocks format-3 snapshot records reach).

A block's name is the sha256 of its bytes: it is checked on receipt (a put whose bytes do not
match is refused whole) and on every read (a block that no longer matches is dropped and reported
to the master, which re-ships it or fetches another copy).

Layout: ``<data>/blocks/<16 hex digits>.log``, the segments of the block log (blocklog.py): a put
is one append (its blocks' entry, and its record's) to the head segment, written over the zeros
pre-filled ahead of its appends and made durable by one ``fdatasync`` (no file created, renamed or
directory fsynced per put, and mostly no new size or blocks to commit), and is whole or absent
after a crash. A segment's size here (``sizes``, compaction's quarter) is where its appends end,
never the head's file size. Rot found in the log at a start (blocklog: a damaged append that is
not a torn last one) is handled as a scrub's finding: its blocks that still match their digests are kept,
the others reported dropped, the records it named reported corrupt (``damaged_records``, which
the chunkserver reports as ``corrupt_records``) unless a good copy of the id is in the log. Blocks that
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

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

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


class LogRecord(NamedTuple):
    """A snapshot record to store in the log (its sha256 checked by the caller)."""

    rid: str
    sha256: str  # hex
    data: bytes


class RecordAt(NamedTuple):
    """Where a record is in the log."""

    name: str  # its segment
    off: int  # where its bytes start in it
    length: int
    sha256: str  # hex, as stored with it
    size: int  # its entry's bytes


class Tomb(NamedTuple):
    """A tombstone in the log, wanted while the segment of the entry it deletes exists."""

    rid: str
    target: str  # the deleted record entry's segment
    off: int  # and where its bytes start there
    name: str  # the tombstone's segment
    size: int  # its entry's bytes


class BlockStore:
    """Directory blocks, and the snapshot records stored with them in the log (see the module
    docstring and blocklog's)."""

    def __init__(self, root: Path, cache_bytes: int = DEFAULT_BYTES) -> None:
        self.dir = root / "blocks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[str, int, int]] = {}
        self.by_prefix: dict[bytes, bytes] = {}  # a digest's first PREFIX bytes -> digest (delta bases)
        self.records: dict[str, RecordAt] = {}  # the records in the log
        self.tombs: dict[str, list[Tomb]] = {}  # the wanted tombstones, by the segment they point into
        self.live: dict[str, int] = {}  # pack or segment name -> blocks, records and tombstones of it wanted
        self.sizes: dict[str, int] = {}  # segment name -> where its appends end (the head's zeros not counted)
        self.wanted: dict[str, int] = {}  # segment name -> bytes of what is wanted in it
        self.dropped: set[bytes] = set()  # failed their digest since the last heartbeat
        self.damaged_records: set[str] = set()  # named by damaged record entries found at the start
        self._check_order: list[str] = []  # the ids check_records goes over in this cycle
        self._check_at = 0  # and how many of them it went over
        self.recent = BlockCache(cache_bytes)  # verified blocks, whole, stored or read lately
        self._lock = threading.Lock()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        files: list[tuple[int, Path]] = []
        for p in [*self.dir.glob("*.pack"), *self.dir.glob("*.log")]:
            try:
                files.append((int(p.stem, 16), p))
            except ValueError:
                log.error("ignoring a block file with a foreign name: %s", p.name)
        files.sort()
        self.head = blocklog.Head(self.dir, files[-1][0] if files else 0)
        self._loading = True  # nothing is unlinked until every file is read
        for _n, p in files:
            if p.suffix == ".pack":
                self._load(p)
            else:
                self._load_segment(p, p == files[-1][1])
        self._loading = False
        self.damaged_records -= self.records.keys()  # a good copy of it is in the log (e.g. before compaction's unlink)
        for _n, p in files:
            if p.suffix == ".log" and p.name in self.sizes and not self.live.get(p.name):
                self._unlink(p.name)
        for target in [t for t in self.tombs if t not in self.live]:  # deleting what is gone
            for tomb in self.tombs.pop(target, []):
                self._unwant(tomb.name, tomb.size)

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
        if data[:len(blocklog.SEGMENT_MAGIC)] not in (blocklog.SEGMENT_MAGIC, blocklog.V1_MAGIC):
            log.error("block log segment %s has a bad magic; ignored", p.name)
            return
        name = p.name
        self.sizes[name] = len(data)
        self.wanted[name] = 0
        torn = None
        zeros = False  # the tail is the pre-filled end (only zeros), not a torn append
        for e in blocklog.scan(data, name, newest):
            if isinstance(e, blocklog.Bad):
                if e.tail:
                    torn, zeros = e.at, e.zeros
                else:
                    self._damaged(name, data, e)
                continue
            size = e.end - e.at
            if e.kind == blocklog.BLOCKS:
                for dg, off, ln in e.blocks:
                    if dg not in self.index:
                        self.index[dg] = (name, off, ln)
                        self.by_prefix[dg[:PREFIX]] = dg
                        self._want(name, 1, ln + _HEAD)
            elif e.kind == blocklog.RECORD:
                old = self.records.get(e.rid)
                self.records[e.rid] = RecordAt(name, e.off, e.length, e.sha256, size)
                self._want(name, 1, size)
                if old is not None:
                    self._unwant(old.name, old.size)
            else:
                cur = self.records.get(e.rid)
                if cur is not None and (cur.name, cur.off) == (e.target, e.off):
                    del self.records[e.rid]
                    self._unwant(cur.name, cur.size)
                if e.target != name:
                    self.tombs.setdefault(e.target, []).append(Tomb(e.rid, e.target, e.off, name, size))
                    self._want(name, 1, size)
        if torn is not None and (newest or zeros):  # (zeros in an older segment: a cut that failed)
            if newest:  # an append a crash cut, or zeros: never read past this point again
                blocklog.cut(p, torn, zeros)
            self.sizes[name] = torn

    def _damaged(self, name: str, data: bytes, bad: blocklog.Bad) -> None:
        """What a damaged part of a segment (rot: see blocklog) held, found at a start, as a
        scrub's finding is: each block it seems to hold is kept if it matches its digest, else
        reported dropped; the record it names is reported (``damaged_records``), its copy not served."""
        for dg, off, ln in bad.blocks:
            if dg in self.index:
                continue
            try:
                verified(dg, data[off:off + ln])
            except CorruptData:
                log.error("block %s in damaged bytes of %s failed its digest; reported dropped", dg.hex(), name)
                self.dropped.add(dg)
                continue
            self.index[dg] = (name, off, ln)
            self.by_prefix[dg[:PREFIX]] = dg
            self._want(name, 1, ln + _HEAD)
        if bad.rid:
            log.error("snapshot record %s in damaged bytes of %s; reported corrupt", bad.rid, name)
            self.damaged_records.add(bad.rid)

    def missing(self, digests: list[bytes]) -> list[bytes]:
        return [d for d in digests if d not in self.index]

    def put(self, items: list[tuple[bytes, bytes]], record: LogRecord | None = None) -> int:
        """Store compressed blocks (as framed on the wire), each verified against its digest
        first (all or nothing), and ``record`` after them in the same append; returns how many
        blocks were new."""
        whole: list[tuple[bytes, bytes]] = []
        for dg, z in items:
            if len(dg) != DIGEST_SIZE:
                raise CorruptData("a block digest is 32 bytes")
            whole.append((dg, verified(dg, z)))
        n = self._store(items, record)
        self.recent.add(whole)
        return n

    def put_delta(self, body: bytes, record: LogRecord | None = None) -> tuple[int, int]:
        """Store a batch of blocks sent as deltas against blocks held here (see blockdelta), each
        rebuilt and checked first (all or nothing; a missing base raises MissingBase), and
        ``record`` after them in the same append; returns (blocks in the batch, how many were new)."""
        fds: dict[str, int] = {}
        by_prefix, index, recent = self.by_prefix.get, self.index, self.recent.get

        def base_of(prefix: bytes) -> bytes | None:
            dg = by_prefix(prefix)
            if dg is None or dg not in index:
                return None
            blk = recent(dg)
            return blk if blk is not None else self._base(dg, fds)

        try:
            got = unpack(body, base_of) if body else []
        finally:
            _close(fds)
        zs = iter(store_compress([blk for _dg, blk, z in got if z is None]))
        n = self._store([(dg, z if z is not None else next(zs)) for dg, _blk, z in got], record)
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

    def _store(self, items: list[tuple[bytes, bytes]], record: LogRecord | None = None) -> int:
        with self._lock:
            new: dict[bytes, bytes] = {}
            for dg, data in items:
                if dg not in self.index:
                    new[dg] = data
            if new or record is not None:
                self._append(list(new.items()), [record] if record is not None else [])
            return len(new)

    def _append(self, blocks: list[tuple[bytes, bytes]], records: list[LogRecord],
                tombs: list[tuple[str, str, int]] | None = None, sync: bool = True) -> None:
        """Append blocks (not in the index, or in a segment being compacted), then records, then
        tombstones (id, segment, offset) to the log as one write (durable with ``sync``), and
        index them there (caller holds the lock)."""
        parts: list[bytes] = []
        where: list[int] = []
        if blocks:
            payload, where = blocklog.frames(blocks)
            parts += blocklog.entry(payload)
        placed: list[tuple[int, int]] = []  # each record's bytes and entry size, from the append's start
        for r in records:
            pay, head = blocklog.record(r.rid, r.sha256, r.data)
            placed.append((sum(map(len, parts)) + blocklog.ENTRY_HEAD + head, blocklog.ENTRY_HEAD + len(pay)))
            parts += blocklog.entry(pay, blocklog.RECORD)
        tombs = tombs or []
        sizes = []
        for rid, target, off in tombs:
            pay = blocklog.tombstone(rid, target, off)
            sizes.append(blocklog.ENTRY_HEAD + len(pay))
            parts += blocklog.entry(pay, blocklog.TOMBSTONE)
        if not parts:
            return
        prev = self.head.name
        name, at = self.head.append(parts, sync)
        self.sizes[name] = self.head.size
        self.wanted.setdefault(name, 0)
        if blocks:
            base = at + blocklog.ENTRY_HEAD
            moved = [old for dg, _z in blocks if (old := self.index.get(dg)) is not None]  # compaction's
            self.index.update({dg: (name, base + off, len(z)) for (dg, z), off in zip(blocks, where, strict=True)})
            self.by_prefix.update({dg[:PREFIX]: dg for dg, _z in blocks})
            self._want(name, len(blocks), len(payload))
            for old_name, _off, ln in moved:
                self._unwant(old_name, ln + _HEAD)
        for r, (off, size) in zip(records, placed, strict=True):
            was = self.records.get(r.rid)
            self.records[r.rid] = RecordAt(name, at + off, len(r.data), r.sha256, size)
            self._want(name, 1, size)
            if was is not None:
                self._unwant(was.name, was.size)
        for (rid, target, off), size in zip(tombs, sizes, strict=True):
            if target != name:
                self.tombs.setdefault(target, []).append(Tomb(rid, target, off, name, size))
                self._want(name, 1, size)
        if prev and prev != name:  # the previous head, sealed now, may be all or mostly unwanted
            if not self.live.get(prev):
                self._unlink(prev)
            else:
                self._compact_if_sparse(prev)

    def _want(self, name: str, n: int, nbytes: int) -> None:
        self.live[name] = self.live.get(name, 0) + n
        self.wanted[name] = self.wanted.get(name, 0) + nbytes

    def _unwant(self, name: str, nbytes: int) -> None:
        """One thing in file ``name`` (of ``nbytes`` in a segment) is no longer wanted: the file
        is unlinked if it was the last (never the head segment)."""
        if name in self.wanted:
            self.wanted[name] -= nbytes
        left = self.live.get(name, 1) - 1
        if left > 0:
            self.live[name] = left
            return
        self.live.pop(name, None)
        if name != self.head.name and not self._loading:
            self._unlink(name)

    def _unlink(self, name: str) -> None:
        """(its tombstones elsewhere are no longer wanted either)"""
        self.sizes.pop(name, None)
        self.wanted.pop(name, None)
        self.live.pop(name, None)
        (self.dir / name).unlink(missing_ok=True)
        for tomb in self.tombs.pop(name, []):
            self._unwant(tomb.name, tomb.size)

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
        name, _off, ln = self.index.pop(dg)
        self.recent.discard(dg)
        if self.by_prefix.get(dg[:PREFIX]) == dg:
            del self.by_prefix[dg[:PREFIX]]
        self._unwant(name, ln + _HEAD)

    def _compact_if_sparse(self, name: str) -> None:
        """A segment other than the head with less than a quarter of its bytes wanted: its wanted
        blocks, records and tombstones appended to the head in one synced write, in that order,
        then the segment unlinked (caller holds the lock). A crash in between leaves both
        copies, each whole."""
        size = self.sizes.get(name)
        if size is None or name == self.head.name or name not in self.live or self.wanted.get(name, 0) * 4 >= size:
            return
        keep = [(dg, off, ln) for dg, (n, off, ln) in self.index.items() if n == name]
        recs = [(rid, r) for rid, r in self.records.items() if r.name == name]
        tombs = [t for ts in self.tombs.values() for t in ts if t.name == name]
        with open(self.dir / name, "rb") as f:
            items = [(dg, os.pread(f.fileno(), ln, off)) for dg, off, ln in keep]
            moved = [LogRecord(rid, r.sha256, os.pread(f.fileno(), r.length, r.off)) for rid, r in recs]
        for t in tombs:
            self.tombs[t.target].remove(t)
        self._append(items, moved, [(t.rid, t.target, t.off) for t in tombs])
        for t in tombs:
            self._unwant(name, t.size)  # the last thing moved unlinks the segment
        log.info("compacted block log segment %s: %d blocks, %d records, %d tombstones moved to %s",
                 name, len(items), len(moved), len(tombs), self.head.name)

    # ------------------------------------------------------------------ records in the log

    def put_record(self, record: LogRecord) -> None:
        """Store a record (its sha256 checked by the caller) with one synced append."""
        with self._lock:
            self._append([], [record])

    def read_record(self, rid: str) -> tuple[bytes, str]:
        """A record's bytes as stored and the sha256 stored with it; KeyError if it is not here."""
        r = self.records[rid]
        try:
            with open(self.dir / r.name, "rb") as f:
                return os.pread(f.fileno(), r.length, r.off), r.sha256
        except FileNotFoundError:  # compacted since: read where it went
            if self.records.get(rid, r) == r:
                raise KeyError(rid) from None
            return self.read_record(rid)

    def check_records(self, count: int, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """The next ``count`` records of the log in turn (a cycle goes over the ids held when it
        began; one stored since waits for the next cycle), each read and checked against the
        sha256 stored with it: the ids that fail (kept: the caller reports them as a scrub does).
        ``skip``: ids not to check (already reported)."""
        if self._check_at >= len(self._check_order):
            self._check_order, self._check_at = list(self.records), 0
        batch = self._check_order[self._check_at:self._check_at + count]
        self._check_at += len(batch)
        bad: list[str] = []
        fds: dict[str, int] = {}
        try:
            for rid in batch:
                r = self.records.get(rid)
                if r is None or rid in skip:
                    continue
                try:
                    fd = fds.get(r.name)
                    if fd is None:
                        fd = fds[r.name] = os.open(self.dir / r.name, os.O_RDONLY)
                    data = os.pread(fd, r.length, r.off)
                except FileNotFoundError:  # compacted meanwhile: checked where it went next cycle
                    continue
                if hashlib.sha256(data).hexdigest() != r.sha256 and self.records.get(rid) == r:
                    bad.append(rid)
        finally:
            _close(fds)
        return bad

    def delete_record(self, rid: str) -> bool:
        """Delete a record from the log (a tombstone appended without a sync: see blocklog)."""
        with self._lock:
            r = self.records.pop(rid, None)
            if r is None:
                return False
            self._append([], [], [(rid, r.name, r.off)], sync=False)
            self._unwant(r.name, r.size)
            self._compact_if_sparse(r.name)
            return True

    def digests(self) -> list[bytes]:
        return list(self.index)

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in [*self.dir.glob("*.pack"), *self.dir.glob("*.log")])


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
