"""The append-only log a chunkserver stores directory blocks in: one append and one ``fdatasync``
make a put durable, with no file created, renamed or directory fsynced per put.

Files: ``<data>/blocks/<16 hex digits>.log``, segments numbered in the order they were created
(after the numbers of the older ``*.pack`` files, which blocks.py still reads). A segment is
``KGBLKLG1`` followed by entries; an entry is ``KGBE``, the payload's length (u32 LE), the CRC32
of that length's 4 bytes and the payload (u32 LE), then the payload: the put's frames as a pack
holds them, ``(<digest 32><u32 length><zstd(bytes)>)*`` (merkle.pack_frames).

Invariants:
  * An entry is acknowledged (``append`` returns) only after its bytes were written and
    ``fdatasync`` returned; every acknowledged entry survives a crash. Appends are serialised by
    the caller (blocks.py holds its store lock across ``append``).
  * A new segment is made durable once, when it is created (its header written and fsynced, then
    the directory fsynced), before any entry goes into it; it is the head until the next one is
    created. A put never spans two segments; a put bigger than ``SEGMENT_BYTES`` is a segment of
    its own. After a restart the first put creates a new head: an old segment is never appended
    to again, so what follows a torn or damaged entry in it can never be taken for an entry.
  * ``scan`` reads a segment's entries in order and stops at the first one that is cut short
    (the file ends inside it), has no magic (zeros where a crash lost a page) or fails its CRC
    (or its frames do not fill its payload exactly): nothing after it in that segment is taken,
    and the file is left as it is (nothing is cut: only a new head is appended to). The stop is
    logged as a warning in the newest segment (the head a crash stopped, where an append that
    was never acknowledged may be torn) and as an error in an older one (damage). A record reaches only blocks whose put was
    acknowledged before the record was stored (ChunkStore.put_record renames a record into place
    only after its blocks' ``append`` returned), so a stop loses no block a record needs, unless
    the disk damaged an acknowledged entry, which the heartbeats then report as missing blocks.
  * A segment's space is reclaimed by its owner (blocks.py): unlinked once no block in it is
    wanted, compacted (its wanted blocks appended to the head, synced, then the segment
    unlinked) once less than a quarter of it is wanted, so the segments other than the head
    hold at most four times the bytes of the blocks wanted in them.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..fsutil import fsync_dir, pwrite_all

log = logging.getLogger("kubegfs.chunkserver.blocklog")

SEGMENT_MAGIC = b"KGBLKLG1"
ENTRY_MAGIC = b"KGBE"
ENTRY_HEAD = 12  # magic, length, CRC
FRAME_HEAD = 36  # digest, length
SEGMENT_BYTES = 8 << 20  # a head at least this big is followed by a new segment
_U32 = struct.Struct("<I")


def segment_name(seq: int) -> str:
    return f"{seq:016x}.log"


def entry(payload: bytes) -> list[bytes]:
    """An entry's parts (its head, then ``payload``: a put's frames, see ``frames``)."""
    ln = _U32.pack(len(payload))
    return [ENTRY_MAGIC + ln + _U32.pack(zlib.crc32(payload, zlib.crc32(ln))), payload]


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


def scan(data: bytes, name: str = "", newest: bool = True) -> Iterator[tuple[int, int, list[tuple[bytes, int, int]]]]:
    """The good entries of segment ``data`` in order: (where the entry starts, its length with
    its head, its blocks as (digest, offset in the file, length)); stops at the first bad one
    (see the module docstring), logged as a warning in the ``newest`` segment (the head when the
    chunkserver stopped: an append a crash cut) and as an error in an older one."""
    if data[:len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        log.error("block log segment %s has a bad magic; ignored", name)
        return
    pos = len(SEGMENT_MAGIC)
    view = memoryview(data)
    while pos < len(data):
        got = _entry_at(data, view, pos)
        if isinstance(got, str):
            (log.warning if newest else log.error)(
                "block log segment %s: the entry at byte %d %s (an append a crash cut, or damage); "
                "nothing after it is read", name, pos, got)
            return
        end, blocks = got
        yield pos, end - pos, blocks
        pos = end


def _entry_at(data: bytes, view: memoryview, pos: int) -> str | tuple[int, list[tuple[bytes, int, int]]]:
    """Why the entry at ``pos`` is not good, or (where it ends, its blocks)."""
    if len(data) - pos < ENTRY_HEAD:
        return "is cut short"
    if data[pos:pos + 4] != ENTRY_MAGIC:
        return "has no magic"
    n = _U32.unpack_from(data, pos + 4)[0]
    end = pos + ENTRY_HEAD + n
    if end > len(data):
        return "is cut short"
    crc = zlib.crc32(view[pos + ENTRY_HEAD:end], zlib.crc32(view[pos + 4:pos + 8]))
    if crc != _U32.unpack_from(data, pos + 8)[0]:
        return "fails its checksum"
    blocks: list[tuple[bytes, int, int]] = []
    p = pos + ENTRY_HEAD
    while p < end:
        if end - p < FRAME_HEAD:
            return "has a frame cut short"
        ln = _U32.unpack_from(data, p + 32)[0]
        if p + FRAME_HEAD + ln > end:
            return "has a frame cut short"
        blocks.append((data[p:p + 32], p + FRAME_HEAD, ln))
        p += FRAME_HEAD + ln
    return end, blocks


class Head:
    """The segment puts are appended to (created on first use; see the module docstring)."""

    def __init__(self, directory: Path, seq: int) -> None:
        self.dir = directory
        self.seq = seq  # the number of the newest segment or pack there is
        self.name = ""  # the head's file name ("" before the first append)
        self.size = 0
        self._fd = -1

    def append(self, parts: list[bytes]) -> tuple[str, int]:
        """Append one entry's ``parts`` durably; (the segment's name, where the entry starts)."""
        n = sum(len(p) for p in parts)
        if self._fd < 0 or self.size >= SEGMENT_BYTES:
            self._roll()
        at = self.size
        try:
            pwrite_all(self._fd, parts, at)
            os.fdatasync(self._fd)
        except BaseException:
            self._abandon()  # what was written may be torn: no entry ever goes after it
            raise
        self.size = at + n
        return self.name, at

    def _roll(self) -> None:
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
