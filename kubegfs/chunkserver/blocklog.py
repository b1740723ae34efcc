"""The append-only log a chunkserver stores directory blocks and snapshot records in: one append
and one ``fdatasync`` make a snapshot's new blocks and its record durable together, with no file
created, renamed or directory fsynced per snapshot.

Files: ``<data>/blocks/<16 hex digits>.log``, segments numbered in the order they were created
(after the numbers of the older ``*.pack`` files, which blocks.py still reads). A segment is
``KGBLKLG1`` followed by entries; an entry is a 4-byte kind, the payload's length (u32 LE), the
CRC32 of that length's 4 bytes and the payload (u32 LE), then the payload:

  ``KGBE`` blocks      a put's frames as a pack holds them, ``(<digest 32><u32 length><zstd(bytes)>)*``
                       (merkle.pack_frames)
  ``KGRE`` record      ``<u16 id length><id><sha256 32><the record's bytes>``
  ``KGRT`` tombstone   ``<u16 id length><id><u64 segment number><u64 offset>``: the record entry
                       of that id at that place is deleted (a record stored again later under
                       the same id, elsewhere, is not)

Invariants:
  * An entry is acknowledged only after its bytes were written and ``fdatasync`` returned; every
    acknowledged entry survives a crash. Appends are serialised by the caller (blocks.py holds
    its lock across ``append``). A tombstone is appended without a sync of its own (a deletion
    may come back after a crash until the next synced append, as an unlinked file's name may
    before its directory is fsynced): the master orders it again.
  * A new segment is made durable once, when it is created (its header written and fsynced, then
    the directory fsynced), before any entry goes into it; it is the head until the next one is
    created. One append (one or more entries) never spans two segments; an append bigger than
    ``SEGMENT_BYTES`` is a segment of its own. After a restart the first append creates a new
    head: an old segment is never appended to again, so what follows a torn or damaged entry in
    it can never be taken for an entry.
  * On start, the newest segment (the head a crash may have stopped in the middle of an append
    that was never acknowledged) is read up to its first bad entry (cut short, no known kind:
    zeros where a crash lost a page, a CRC that fails, contents that do not fill the payload),
    and cut there: what followed is moved aside to ``<segment>.corrupt-<unix time>`` (a warning
    in the log) and the segment truncated and fsynced, so that no later start reads past that
    point. In an older segment every entry was synced before anything after it in the file was
    written (one append is one write, and the next segment is created only after the last
    append to this one returned and was synced; an append that failed ends its segment), so a bad
    entry there is damage, or the end of an append that failed, never a crash: one whose head
    is whole is skipped, an error in the log; the scan stops at one whose head is not (also an
    error). Nothing is ever appended to a segment after a restart (a new head is created).
  * **A record is never there without its blocks.** A snapshot's new blocks and its record are
    one append, the blocks' entry first; the blocks it reaches that were already held were
    acknowledged earlier, so they are in an earlier append that was synced first (in this
    segment, or in an older one, which was never appended to after this one was created). A crash
    during the append may persist the record's page and lose an earlier one of the blocks: the
    scan then stops at the blocks' entry (its CRC or kind fails) and never reaches the record,
    and the segment is cut there before it can ever be read as an older one.
    Compaction copies a segment's wanted blocks before its wanted records in one append, and
    unlinks the segment only after that append was synced.
  * A segment's space is reclaimed by its owner (blocks.py): unlinked once nothing in it is
    wanted (a tombstone is wanted while the segment of the record it deletes exists), compacted
    (what is wanted appended to the head, synced, then the segment unlinked) once less than a
    quarter of it is wanted, so the segments other than the head hold at most four times the
    bytes wanted in them.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..fsutil import fsync_dir, pwrite_all

log = logging.getLogger("kubegfs.chunkserver.blocklog")

SEGMENT_MAGIC = b"KGBLKLG1"
BLOCKS = b"KGBE"
RECORD = b"KGRE"
TOMBSTONE = b"KGRT"
KINDS = (BLOCKS, RECORD, TOMBSTONE)
ENTRY_HEAD = 12  # magic, length, CRC
FRAME_HEAD = 36  # digest, length
SEGMENT_BYTES = 8 << 20  # a head at least this big is followed by a new segment
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_PLACE = struct.Struct("<QQ")


class Entry(NamedTuple):
    """A good entry as ``scan`` finds it."""

    kind: bytes
    at: int  # where it starts in the segment
    end: int  # where the next one starts
    blocks: list[tuple[bytes, int, int]]  # BLOCKS: (digest, offset in the file, length)
    rid: str = ""  # RECORD, TOMBSTONE: the record's id
    sha256: str = ""  # RECORD: its sha256 (hex)
    off: int = 0  # RECORD: where its bytes start in the file; TOMBSTONE: the deleted entry's offset
    length: int = 0  # RECORD: how many bytes it is
    target: str = ""  # TOMBSTONE: the segment of the deleted entry


def segment_name(seq: int) -> str:
    return f"{seq:016x}.log"


def cut(path: Path, good: int) -> None:
    """Cut segment ``path`` after its first ``good`` bytes, durably, keeping what followed beside
    it as ``<name>.corrupt-<unix time>``."""
    with open(path, "r+b") as f:
        f.seek(good)
        tail = f.read()
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with open(aside, "wb") as g:
            g.write(tail)
            g.flush()
            os.fsync(g.fileno())
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    log.warning("block log segment %s cut after byte %d; the %d bytes after it kept as %s",
                path.name, good, len(tail), aside.name)


def entry(payload: bytes, kind: bytes = BLOCKS) -> list[bytes]:
    """An entry's parts (its head, then ``payload``: see ``frames``, ``record`` and ``tombstone``)."""
    ln = _U32.pack(len(payload))
    return [kind + ln + _U32.pack(zlib.crc32(payload, zlib.crc32(ln))), payload]


def record(rid: str, sha256: str, data: bytes) -> tuple[bytes, int]:
    """A record entry's payload, and where the record's bytes start in it."""
    name = rid.encode()
    head = _U16.pack(len(name)) + name + bytes.fromhex(sha256)
    return head + data, len(head)


def tombstone(rid: str, target: str, off: int) -> bytes:
    """A tombstone's payload: the record entry of ``rid`` whose bytes are at ``off`` in segment
    ``target`` is deleted."""
    name = rid.encode()
    return _U16.pack(len(name)) + name + _PLACE.pack(int(target[:16], 16), off)


def frames(items: list[tuple[bytes, bytes]]) -> tuple[bytes, list[int]]:
    """A put's blocks (digest, compressed bytes) as an entry's payload, as merkle.pack_frames
    lays them, and where each block's bytes start in it."""
    parts: list[bytes] = []
    where: list[int] = []
    off = FRAME_HEAD
    pack = _U32.pack
    for dg, z in items:
        parts += (dg, pack(len(z)), z)
        where.append(off)
        off += FRAME_HEAD + len(z)
    return b"".join(parts), where


def scan(data: bytes, name: str = "", newest: bool = True) -> Iterator[Entry]:
    """The good entries of segment ``data`` in order (see the module docstring): in the
    ``newest`` segment up to the first bad one (a warning: the caller cuts the file there); in an
    older one, an entry whose head is whole but whose contents fail their CRC is skipped (an
    error: damage), and the scan stops at an entry whose head is bad (an error)."""
    if data[:len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        log.error("block log segment %s has a bad magic; ignored", name)
        return
    pos = len(SEGMENT_MAGIC)
    view = memoryview(data)
    while pos < len(data):
        got = _entry_at(data, view, pos)
        if isinstance(got, Entry):
            yield got
            pos = got.end
            continue
        why, end = got
        if newest:
            log.warning("block log segment %s: the entry at byte %d %s (an append a crash cut, or damage); "
                        "nothing after it is read", name, pos, why)
            return
        if end is None:
            log.error("block log segment %s: the entry at byte %d %s; nothing after it is read", name, pos, why)
            return
        log.error("block log segment %s: the entry at byte %d %s; skipped", name, pos, why)
        pos = end


def _entry_at(data: bytes, view: memoryview, pos: int) -> Entry | tuple[str, int | None]:
    """The entry at ``pos``, or why it is not good and where it ends if its head is whole."""
    if len(data) - pos < ENTRY_HEAD:
        return "is cut short", None
    kind = data[pos:pos + 4]
    if kind not in KINDS:
        return "has no known kind", None
    n = _U32.unpack_from(data, pos + 4)[0]
    start, end = pos + ENTRY_HEAD, pos + ENTRY_HEAD + n
    if end > len(data):
        return "is cut short", None
    crc = zlib.crc32(view[start:end], zlib.crc32(view[pos + 4:pos + 8]))
    if crc != _U32.unpack_from(data, pos + 8)[0]:
        return "fails its checksum", end
    if kind != BLOCKS:
        if n < 2 or (p := start + 2 + _U16.unpack_from(data, start)[0]) > end:
            return "has an id cut short", end
        try:
            rid = data[start + 2:p].decode()
        except UnicodeDecodeError:
            return "has an id that is not UTF-8", end
        if kind == RECORD:
            if end - p < 32:
                return "has a sha256 cut short", end
            return Entry(kind, pos, end, [], rid, data[p:p + 32].hex(), p + 32, end - p - 32)
        if end - p != _PLACE.size:
            return "has a place of the wrong size", end
        seq, off = _PLACE.unpack_from(data, p)
        return Entry(kind, pos, end, [], rid, off=off, target=segment_name(seq))
    blocks: list[tuple[bytes, int, int]] = []
    p = start
    while p < end:
        if end - p < FRAME_HEAD:
            return "has a frame cut short", end
        ln = _U32.unpack_from(data, p + 32)[0]
        if p + FRAME_HEAD + ln > end:
            return "has a frame cut short", end
        blocks.append((data[p:p + 32], p + FRAME_HEAD, ln))
        p += FRAME_HEAD + ln
    return Entry(kind, pos, end, blocks)


class Head:
    """The segment puts are appended to (created on first use; see the module docstring)."""

    def __init__(self, directory: Path, seq: int) -> None:
        self.dir = directory
        self.seq = seq  # the number of the newest segment or pack there is
        self.name = ""  # the head's file name ("" before the first append)
        self.size = 0
        self._fd = -1
        self._unsynced = False  # a tombstone was appended after the last fdatasync

    def append(self, parts: list[bytes], sync: bool = True) -> tuple[str, int]:
        """Append the entries ``parts`` (durably with ``sync``); (the segment's name, where they start)."""
        n = sum(len(p) for p in parts)
        if self._fd < 0 or self.size >= SEGMENT_BYTES:
            self._roll()
        at = self.size
        try:
            pwrite_all(self._fd, parts, at)
            if sync:
                os.fdatasync(self._fd)
            self._unsynced = not sync
        except BaseException:
            self._abandon()  # what was written may be torn: no entry ever goes after it
            raise
        self.size = at + n
        return self.name, at

    def _roll(self) -> None:
        if self._fd >= 0 and self._unsynced:  # everything in a segment is synced before the next exists
            os.fdatasync(self._fd)
        self.close()
        self.seq += 1
        name = segment_name(self.seq)
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            pwrite_all(fd, [SEGMENT_MAGIC], 0)
            os.fsync(fd)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.name, self.size = fd, name, len(SEGMENT_MAGIC)

    def _abandon(self) -> None:
        self.close()
        self.size = SEGMENT_BYTES  # the next append starts a new segment

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
