"""The append-only log a chunkserver stores directory blocks and snapshot records in: one append
and one ``fdatasync`` make a snapshot's new blocks and its record durable together, with no file
created, renamed or directory fsynced per snapshot.

Files: ``<data>/blocks/<16 hex digits>.log``, segments numbered in the order they were created
(after the numbers of the older ``*.pack`` files, which blocks.py still reads). A segment is
``KGBLKLG2`` followed by appends; an append (one write, one ``fdatasync``) is an append head then
the entries it was written with. An entry is a 4-byte kind, the payload's length (u32 LE), the
CRC32 of that length's 4 bytes and the payload (u32 LE), then the payload:

  ``KGAP`` append head ``<u64 where this head starts in the segment><u64 bytes of the entries after
                       it in its append>`` (``APPEND_HEAD`` bytes in all): where the next append
                       starts is known without trusting the entries of this one, and when a head
                       is damaged the next one is found by scanning forward (see below)
  ``KGBE`` blocks      a put's frames as a pack holds them, ``(<digest 32><u32 length><zstd(bytes)>)*``
                       (merkle.pack_frames)
  ``KGRE`` record      ``<u16 id length><id><sha256 32><the record's bytes>``
  ``KGRT`` tombstone   ``<u16 id length><id><u64 segment number><u64 offset>``: the record entry
                       of that id at that place is deleted (a record stored again later under
                       the same id, elsewhere, is not)

The head segment (the one appended to) is pre-filled: zeros are written ``PREFILL_BYTES`` ahead of
its appends (when it is created, and then with each append that reaches past them, in the same
write and under the same ``fdatasync``; never past ``SEGMENT_BYTES``), and appends overwrite them in
place, so the ``fdatasync`` of an append flushes its data alone, with no journal commit for a new
size or new blocks (the master's op-log and its copies sync on the same disk at the same moment,
and commits queue behind each other). An append bigger than the zeros left simply writes past
them and the next ``PREFILL_BYTES`` after itself. Where the appends end is known from the appends,
never from the file's size (``Head.size``; ``BlockStore.sizes``): only zeros from an append's end
to the segment's end (``zeros_from``: the last ``PREFILL_BYTES`` are looked at, so a start does not
walk the zeros) are the pre-filled end, neither damage nor a torn append, and not reported (``Bad``
with ``zeros``). A segment is cut to its appends' end, durably, when the next one is created, so
only the head has a zero tail; a start cuts the newest segment's (see below).

Segments of earlier versions (``KGBLKLG1``: entries with no append heads) are read, never written,
by the rules those versions had: the newest is cut at its first bad entry; in an older one an
entry whose head is whole but whose contents fail is skipped, and the scan stops at one whose head
is not. (They were never pre-filled.)

Invariants:
  * An entry is acknowledged only after its bytes were written and ``fdatasync`` returned; every
    acknowledged entry survives a crash. Appends are serialised by the caller (blocks.py holds
    its lock across ``append``). A tombstone is appended without a sync of its own (a deletion
    may come back after a crash until the next synced append, as an unlinked file's name may
    before its directory is fsynced): the master orders it again.
  * A new segment is made durable once, when it is created (its header and its first zeros
    written and fsynced, then the directory fsynced), before any append goes into it; it is the
    head until the next one is created, and just before that it is cut to its appends' end and
    fsynced (which also syncs a tombstone's append). One append never spans two segments; an
    append bigger than ``SEGMENT_BYTES`` is a segment of its own. After a restart, or an append
    that failed (cut off again if the disk allows), the next append creates a new head: an old
    segment is never appended to again.
  * **A torn append is the last thing in its segment; damage anywhere else is rot.** Each append
    is written only after the one before it returned from ``fdatasync``, so a crash can tear only
    the last append of the newest segment, and any byte after an append's end that is not a zero
    was written after that append was synced (zeros after it may have been written with it or
    before it: a torn append lies on zeros and is followed by zeros; so an append is proved
    synced by a good append head after it, which is never zeros). (The one exception, an append
    of tombstones alone, is not synced before the next append is written: a crash may tear it
    with a later one on disk, and it is then taken as rot; what it loses is deletions, which the
    master orders again. Every append that holds a block or a record is synced before anything
    after it is written.) A segment is read append by append; an append is damaged if its head
    is bad (cut short, not ``KGAP``, a CRC that fails, an offset not its own) or one of its
    entries is (cut short, no known kind, a CRC that fails, contents that do not fill its
    payload, past its append's end):
      - A damaged append that runs to the end of the segment (its head good and only zeros
        after its end, or its end past the segment's end; or its head bad and no good head after
        it) is a torn tail, never acknowledged: nothing in it is used. In the newest segment the
        file is cut at its start: what followed, up to its last byte that is not zero, is moved
        aside to ``<segment>.corrupt-<unix time>`` (a warning in the log), the segment truncated
        and fsynced, so that no later start reads past that point. In an older one (an append
        that failed ends its segment) nothing is cut. Only zeros where an append would start
        (the pre-filled end, or an append of which nothing reached the disk) end the scan
        quietly; a start cuts them off the newest segment (truncated and fsynced, nothing kept
        aside).
      - Any other damaged append is rot, and nothing is cut: it was synced and acknowledged before
        what follows was written. (Rot that zeroes bytes, even a whole append, is told from the zero
        end by what follows them: a good append head.) The scan goes on at the next append: at its
        head's end, or, if the head is bad, at the next offset where a good head names that offset
        as its own (heads have a fixed size and their own CRC, so neither a length field nor garbage
        that looks like a head can make the scan read out of bounds, loop, or resync inside a
        payload). Inside the damaged append, an entry whose CRC holds is kept; one that fails is
        passed over by its length only if the entries after it are good and end exactly at the
        append's end, else the rest of the append is one damaged region. What a damaged entry or
        region held is reported as a scrub's finding is (blocks.py): each block of a blocks entry
        whose frames can still be walked is checked against its digest and kept if it matches, else
        reported dropped; the id a record entry names is reported as a corrupt record (its copy is
        not served); a tombstone is lost (the master orders the deletion again). An error in the
        log.
  * **A record is never there without its blocks** (after a crash). A snapshot's new blocks and
    its record are one append, the blocks' entry first; the blocks it reaches that were already
    held were acknowledged earlier, so they are in an earlier append that was synced first (in
    this segment, or in an older one, which was never appended to after this one was created). A
    crash during the append may persist the record's page and lose an earlier one of the blocks:
    that append is then the torn tail, nothing in it is used, and it is cut before it can ever be
    read as anything else. (Rot after the append was acknowledged can take blocks a record
    reaches: they are reported dropped, as when a scrub finds them, and the master ships them
    again.) Compaction copies a segment's wanted blocks before its wanted records in one append,
    and unlinks the segment only after that append was synced.
  * A segment's space is reclaimed by its owner (blocks.py): unlinked once nothing in it is
    wanted (a tombstone is wanted while the segment of the record it deletes exists), compacted
    (what is wanted appended to the head, synced, then the segment unlinked) once less than a
    quarter of it is wanted (of its appends' bytes: a head's zeros are not counted, and an
    older segment has none), so the segments other than the head hold at most four times the
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

SEGMENT_MAGIC = b"KGBLKLG2"  # segments with append heads
V1_MAGIC = b"KGBLKLG1"  # segments of earlier versions, read only
APPEND = b"KGAP"
BLOCKS = b"KGBE"
RECORD = b"KGRE"
TOMBSTONE = b"KGRT"
KINDS = (BLOCKS, RECORD, TOMBSTONE)
ENTRY_HEAD = 12  # magic, length, CRC
APPEND_HEAD = ENTRY_HEAD + 16  # an append head: its entry head, its offset and its entries' bytes
FRAME_HEAD = 36  # digest, length
SEGMENT_BYTES = 8 << 20  # a head whose appends end at least this far is followed by a new segment
PREFILL_BYTES = 1 << 20  # zeros kept ahead of the head's appends (at most this many end a segment)
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_PLACE = struct.Struct("<QQ")
_APPEND_LEN = _U32.pack(16)


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


class Bad(NamedTuple):
    """A damaged part of a segment as ``scan`` finds it (see the module docstring)."""

    at: int
    end: int
    why: str
    tail: bool  # runs to the segment's end: never acknowledged, nothing in it is used (in the newest: cut)
    # not a tail (rot): what it held, as far as can be read (not to be trusted: to be reported)
    blocks: tuple[tuple[bytes, int, int], ...] = ()  # frames of a blocks entry, each to check by its digest
    rid: str = ""  # the id a record entry names
    zeros: bool = False  # only zeros from ``at`` (a tail): the pre-filled end, where the appends end, not damage


def segment_name(seq: int) -> str:
    return f"{seq:016x}.log"


def zeros_from(data: bytes, lo: int = 0) -> int:
    """Where the zeros that end ``data`` start (not before ``lo``; ``len(data)`` if it does not
    end with one). Only the last ``PREFILL_BYTES`` are looked at (a pre-filled end is never
    longer): a longer run of zeros is taken to start there."""
    if not data or data[-1]:
        return len(data)
    start = max(lo, len(data) - PREFILL_BYTES)
    return start + len(data[start:].rstrip(b"\0"))


def cut(path: Path, good: int, zeros: bool = False) -> None:
    """Cut segment ``path`` after its first ``good`` bytes, durably, keeping what followed beside
    it (up to its last byte that is not zero) as ``<name>.corrupt-<unix time>``; ``zeros``: only
    zeros follow (a pre-filled end), nothing is kept and nothing said."""
    if zeros:
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
        return
    with open(path, "r+b") as f:
        f.seek(good)
        tail = f.read().rstrip(b"\0")
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with open(aside, "wb") as g:
            g.write(tail)
            g.flush()
            os.fsync(g.fileno())
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    log.warning("block log segment %s cut after byte %d; the %d bytes after it (to the last one not zero) "
                "kept as %s", path.name, good, len(tail), aside.name)


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


def scan(data: bytes, name: str = "", newest: bool = True) -> Iterator[Entry | Bad]:
    """The entries of segment ``data`` in order, good ones as ``Entry`` and damaged parts as
    ``Bad`` (see the module docstring): a damaged append that is not the segment's tail (rot) is
    reported with an error and the scan goes on after it; a tail ends the scan (a warning in the
    newest segment, where the caller cuts the file at its start; an error in an older one). Only
    zeros where an append would start end it with a tail whose ``zeros`` is set, and nothing said
    (the pre-filled end: the caller cuts it off the newest segment, keeping nothing aside)."""
    if data[:len(SEGMENT_MAGIC)] == V1_MAGIC:
        yield from _scan_v1(data, name, newest)
        return
    if data[:len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
        log.error("block log segment %s has a bad magic; ignored", name)
        return
    view = memoryview(data)
    total = len(data)
    pos = len(SEGMENT_MAGIC)
    zeros = zeros_from(data, pos)  # only zeros from here on (looked for in the last PREFILL_BYTES)
    while pos < total:
        if pos >= zeros:  # the pre-filled end: no append, nothing damaged
            yield Bad(pos, total, "is the pre-filled end (zeros)", True, zeros=True)
            return
        size = _append_head_at(data, pos)
        if size is None:
            nxt = _next_append(data, pos + 1)
            if nxt is None and data.count(0, pos, zeros) == zeros - pos:  # zeros, longer than a pre-fill
                yield Bad(pos, total, "is zeros to the end", True, zeros=True)  # (nothing an append left)
                return
            if nxt is None:
                yield _tail(name, newest, pos, total, "has a bad head")
                return
            log.error("block log segment %s: the append at byte %d has a bad head; a good one follows at byte "
                      "%d, so it is damage, not an append a crash cut: the rest of the segment is read",
                      name, pos, nxt)
            got = _walk(data, view, pos + APPEND_HEAD, nxt)
            if not any(isinstance(e, Bad) for e in got):  # (only the head was hit)
                got.insert(0, Bad(pos, min(pos + APPEND_HEAD, nxt), "has a bad head", False))
            yield from _reported(got, name)
            pos = nxt
            continue
        end = pos + APPEND_HEAD + size
        if end > total:
            yield _tail(name, newest, pos, total, "is cut short")
            return
        got = _walk(data, view, pos + APPEND_HEAD, end)
        if end >= zeros and any(isinstance(e, Bad) for e in got):  # nothing but zeros after it
            yield _tail(name, newest, pos, total, "has a bad entry")
            return
        yield from _reported(got, name)
        pos = end


def _reported(got: list[Entry | Bad], name: str) -> list[Entry | Bad]:
    for e in got:
        if isinstance(e, Bad):
            log.error("block log segment %s: the entry at byte %d %s, in an append that is not the last one (damage, "
                      "not an append a crash cut): bytes %d to %d are reported damaged, the rest is read",
                      name, e.at, e.why, e.at, e.end)
    return got


def _tail(name: str, newest: bool, pos: int, total: int, why: str) -> Bad:
    if newest:
        log.warning("block log segment %s: the append at byte %d %s and nothing good follows it (an append a "
                    "crash cut); nothing after it is read", name, pos, why)
    else:
        log.error("block log segment %s: the append at byte %d %s and nothing good follows it (an append that "
                  "failed, or damage); nothing after it is read", name, pos, why)
    return Bad(pos, total, why, True)


def _append_head_at(data: bytes, pos: int) -> int | None:
    """The bytes of the entries after the good append head at ``pos``, or None."""
    if len(data) - pos < APPEND_HEAD or data[pos:pos + 4] != APPEND or data[pos + 4:pos + 8] != _APPEND_LEN:
        return None
    if zlib.crc32(data[pos + 12:pos + APPEND_HEAD], zlib.crc32(_APPEND_LEN)) != _U32.unpack_from(data, pos + 8)[0]:
        return None
    at, size = _PLACE.unpack_from(data, pos + 12)
    return size if at == pos else None


def _next_append(data: bytes, pos: int) -> int | None:
    """Where the first good append head at or after ``pos`` starts, or None."""
    while (pos := data.find(APPEND, pos)) >= 0:
        if _append_head_at(data, pos) is not None:
            return pos
        pos += 1
    return None


def _walk(data: bytes, view: memoryview, pos: int, end: int) -> list[Entry | Bad]:
    """The entries of an append from ``pos`` to its ``end``: good ones, and what is damaged (an
    entry passed over by its length only if what follows it is good and ends at ``end``; else the
    rest, one damaged region)."""
    out: list[Entry | Bad] = []
    while pos < end:
        got = _entry_at(data, view, pos, end)
        if isinstance(got, Entry):
            out.append(got)
            pos = got.end
            continue
        why, nxt = got
        rest = _chain(data, view, nxt, end) if nxt is not None else None
        out.append(_salvage(data, pos, nxt if rest is not None and nxt is not None else end, why))
        out += rest or []
        break
    return out


def _chain(data: bytes, view: memoryview, pos: int, end: int) -> list[Entry | Bad] | None:
    """The good entries from ``pos`` that end exactly at ``end``, or None if one is not good."""
    out: list[Entry | Bad] = []
    while pos < end:
        got = _entry_at(data, view, pos, end)
        if not isinstance(got, Entry):
            return None
        out.append(got)
        pos = got.end
    return out


def _salvage(data: bytes, pos: int, end: int, why: str) -> Bad:
    """A damaged entry (or region starting with one) at ``pos`` up to ``end``, with what it seems
    to hold: the frames of a blocks entry as far as they can be walked, the id of a record entry."""
    kind = data[pos:pos + 4]
    start = pos + ENTRY_HEAD
    blocks: list[tuple[bytes, int, int]] = []
    rid = ""
    if kind == BLOCKS:
        p = start
        while end - p >= FRAME_HEAD:
            ln = _U32.unpack_from(data, p + 32)[0]
            if p + FRAME_HEAD + ln > end:
                break
            blocks.append((data[p:p + 32], p + FRAME_HEAD, ln))
            p += FRAME_HEAD + ln
    elif kind == RECORD and end - start >= 2:
        p = start + 2 + _U16.unpack_from(data, start)[0]
        if p + 32 <= end:
            try:
                rid = data[start + 2:p].decode()
            except UnicodeDecodeError:
                pass
    return Bad(pos, end, why, False, tuple(blocks), rid)


def _scan_v1(data: bytes, name: str, newest: bool) -> Iterator[Entry | Bad]:
    """A segment of an earlier version (no append heads; see the module docstring)."""
    pos = len(V1_MAGIC)
    view = memoryview(data)
    while pos < len(data):
        got = _entry_at(data, view, pos, len(data))
        if isinstance(got, Entry):
            yield got
            pos = got.end
            continue
        why, end = got
        if newest:
            log.warning("block log segment %s: the entry at byte %d %s (an append a crash cut, or damage); "
                        "nothing after it is read", name, pos, why)
            yield Bad(pos, len(data), why, True)
            return
        if end is None:
            log.error("block log segment %s: the entry at byte %d %s; nothing after it is read", name, pos, why)
            yield Bad(pos, len(data), why, True)
            return
        log.error("block log segment %s: the entry at byte %d %s; skipped", name, pos, why)
        yield _salvage(data, pos, end, why)
        pos = end


def _entry_at(data: bytes, view: memoryview, pos: int, limit: int) -> Entry | tuple[str, int | None]:
    """The entry at ``pos`` (which must end by ``limit``), or why it is not good and where it ends
    if its head is whole."""
    if limit - pos < ENTRY_HEAD:
        return "is cut short", None
    kind = data[pos:pos + 4]
    if kind not in KINDS:
        return "has no known kind", None
    n = _U32.unpack_from(data, pos + 4)[0]
    start, end = pos + ENTRY_HEAD, pos + ENTRY_HEAD + n
    if end > limit:
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


def append_head(at: int, size: int) -> list[bytes]:
    """The head of an append at offset ``at`` whose entries are ``size`` bytes."""
    return entry(_PLACE.pack(at, size), APPEND)


class Head:
    """The segment puts are appended to (created on first use; see the module docstring)."""

    def __init__(self, directory: Path, seq: int) -> None:
        self.dir = directory
        self.seq = seq  # the number of the newest segment or pack there is
        self.name = ""  # the head's file name ("" before the first append)
        self.size = 0  # where its appends end (the next one starts)
        self.filled = 0  # where the zeros after them end (the file's size)
        self._fd = -1
        self._unsynced = False  # a tombstone was appended after the last fdatasync

    def append(self, parts: list[bytes], sync: bool = True) -> tuple[str, int]:
        """Append the entries ``parts`` after an append head (durably with ``sync``); (the
        segment's name, where ``parts`` start). Written over the zeros ahead of the appends; an
        append that reaches past them writes the next ``PREFILL_BYTES`` of zeros after itself."""
        n = sum(len(p) for p in parts)
        if self._fd < 0 or self.size >= SEGMENT_BYTES:
            self._roll()
        at = self.size
        end = at + APPEND_HEAD + n
        out = [*append_head(at, n), *parts]
        filled = self.filled
        if end > filled:
            filled = max(end, min(end + PREFILL_BYTES, SEGMENT_BYTES))
            if filled > end:
                out.append(bytes(filled - end))
        try:
            pwrite_all(self._fd, out, at)
            if sync:
                os.fdatasync(self._fd)
            self._unsynced = not sync
        except BaseException:
            self._abandon(at)  # what was written may be torn: no entry ever goes after it
            raise
        self.size, self.filled = end, filled
        return self.name, at + APPEND_HEAD

    def _roll(self) -> None:
        if self._fd >= 0 and self.filled > self.size:  # cut to its appends' end, durably (and so synced)
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        elif self._fd >= 0 and self._unsynced:  # everything in a segment is synced before the next exists
            os.fdatasync(self._fd)
        self.close()
        self.seq += 1
        name = segment_name(self.seq)
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        filled = max(len(SEGMENT_MAGIC), min(len(SEGMENT_MAGIC) + PREFILL_BYTES, SEGMENT_BYTES))
        try:
            pwrite_all(fd, [SEGMENT_MAGIC, bytes(filled - len(SEGMENT_MAGIC))], 0)
            os.fsync(fd)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.name, self.size, self.filled = fd, name, len(SEGMENT_MAGIC), filled

    def _abandon(self, at: int) -> None:
        """After an append at ``at`` failed: cut the segment back to where it started if the
        disk allows (else a start finds the torn append, or zeros, at its end), never append to
        it again."""
        try:
            os.ftruncate(self._fd, at)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("block log segment %s: could not cut a failed append off at byte %d: %s", self.name, at, exc)
        self.close()
        self.size = SEGMENT_BYTES  # the next append starts a new segment

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
