"""A chunkserver's disk: chunks as files under its data dir, one CRC32 per 64 KiB block, and the
snapshot record store. Handles are opaque integers; no client-supplied path is ever opened.

Layout:  <data>/chunks/<2 hex>/<16 hex>.chk   chunk bytes
         <data>/chunks/<2 hex>/<16 hex>.meta  version, length, block CRCs (formats.chunk meta)
                                              of the chunk's last *durable* state
Snapshot records are stored in the log of directory blocks (blocks.py, blocklog.py), with the
blocks they reach in the same append. Still read (and deleted), never written: the files earlier
versions stored them in,
         <data>/records/<id>.rec               a SnapObj record
         <data>/records/<id>.sha256            its sha256 (hex)
(a record in the log is the one served when both are there). Every record's sha256 is checked on
receipt and on every read. All methods are blocking; the server calls them from worker threads.

A write with ``sync=False`` (a piece in the middle of a chunk) is not acknowledged as durable: its
bytes go to the page cache and its length and CRCs stay in memory (``_pending``). The next synced
write (the client's last piece of the chunk) fdatasyncs the data, then replaces the metadata
durably. So the metadata on disk always describes bytes that are on disk: after a crash a chunk
is back at its last acknowledged length, never a mix that fails its checksums.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import threading
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from .. import rangecrc
from ..crc import crc32
from ..errors import Conflict, CorruptData, InvalidArgument, NoSpace, NotFound
from ..formats import BLOCK_SIZE, decode_chunk_meta, encode_chunk_meta
from ..fsutil import atomic_write, fsync_path, pwrite_all
from .blocks import BlockStore, LogRecord

RESERVE = 1 << 20  # free space a write never takes (for metadata, records and the OS)
NEW_FILES = 3 * 4096  # a new chunk's data and metadata files (and the metadata's temporary copy)


class ChunkStore:
    def __init__(self, root: Path, chunk_size: int, log: BlockStore | None = None) -> None:
        self.root = root
        self.log = log if log is not None else BlockStore(root, 0)  # where records are stored
        self.chunk_size = chunk_size
        self.chunks_dir = root / "chunks"
        self.records_dir = root / "records"
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._space = threading.Lock()
        self._claimed = 0  # bytes promised to writes in progress, not yet visible in statvfs
        self._locks: dict[int, threading.Lock] = {}
        self.index: dict[int, tuple[int, int]] = {}  # handle -> (version, length)
        self.chunk_bytes = 0  # sum of the lengths in ``index``, kept as it changes
        self.corrupt: set[int] = set()
        self._pending: dict[int, tuple[int, int, array]] = {}  # handle -> unsynced (version, length, CRCs)
        self.record_sizes: dict[str, int] = {}  # record id -> bytes, as of the last pass or store
        self._sidecars: dict[str, tuple[tuple[int, int, int], str]] = {}  # id -> (sidecar stat, sha256)
        # the records' [size, sha256] as of the last pass of the directory, with the puts and
        # deletes since (None before the first pass); the lock orders a pass with those updates
        self._digests: dict[str, list[int | str]] | None = None
        self._digests_lock = threading.Lock()
        self._load()

    # ------------------------------------------------------------------ bookkeeping

    def _load(self) -> None:
        """Index the chunks on disk and tidy what a crash can leave behind: temp files, data
        files whose metadata is gone (an interrupted delete), and bytes past the recorded length
        (an interrupted write) — none of which was ever acknowledged."""
        for tmp in list(self.chunks_dir.glob("*/*.tmp")) + list(self.records_dir.glob("*.tmp")):
            tmp.unlink(missing_ok=True)
        for meta in self.chunks_dir.glob("*/*.meta"):
            try:
                h = int(meta.stem, 16)
            except ValueError:
                continue
            try:
                v, length, _ = decode_chunk_meta(meta.read_bytes())
            except CorruptData:
                self.corrupt.add(h)
                continue
            data = meta.with_suffix(".chk")
            try:
                if data.stat().st_size > length:
                    os.truncate(data, length)
            except FileNotFoundError:
                self.corrupt.add(h)
                continue
            self._index_set(h, v, length)
        for data in self.chunks_dir.glob("*/*.chk"):
            if not data.with_suffix(".meta").exists():
                data.unlink(missing_ok=True)
        self.record_digests()

    def lock(self, h: int) -> threading.Lock:
        with self._lock:
            lk = self._locks.get(h)
            if lk is None:
                lk = self._locks[h] = threading.Lock()
            return lk

    def _paths(self, h: int) -> tuple[Path, Path]:
        name = f"{h:016x}"
        d = self.chunks_dir / name[-2:]
        return d / (name + ".chk"), d / (name + ".meta")

    def _index_set(self, h: int, version: int, length: int) -> None:
        old = self.index.get(h)
        self.chunk_bytes += length - (old[1] if old else 0)
        self.index[h] = (version, length)

    def used_bytes(self) -> int:
        return self.chunk_bytes + sum(self.record_sizes.values())

    def capacity_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @contextlib.contextmanager
    def _claim(self, n: int) -> Iterator[None]:
        """Reserve ``n`` bytes of free space for one write, atomically with the check, so
        concurrent writes never take the last ``RESERVE`` bytes between them."""
        with self._space:
            if self.free_bytes() - self._claimed < n + RESERVE:
                raise NoSpace("chunkserver disk is full")
            self._claimed += n
        try:
            yield
        finally:
            with self._space:
                self._claimed -= n

    def _write_meta(self, meta_path: Path, version: int, length: int, crcs: array) -> None:
        """Durably (the directory fsync also makes a new chunk's data file name durable)."""
        atomic_write(meta_path, encode_chunk_meta(version, length, crcs))

    def _meta(self, h: int) -> tuple[int, int, array]:
        """The chunk's current version, length and CRCs, including unsynced writes."""
        cur = self._pending.get(h)
        return cur if cur is not None else self._read_meta(h)

    def _make_durable(self, h: int) -> None:
        """Sync a chunk's unsynced writes and their metadata (caller holds the chunk's lock)."""
        cur = self._pending.pop(h, None)
        if cur is None:
            return
        data_path, meta_path = self._paths(h)
        fsync_path(data_path, data_only=True)
        self._write_meta(meta_path, *cur)

    def _read_meta(self, h: int) -> tuple[int, int, array]:
        _, meta = self._paths(h)
        try:
            return decode_chunk_meta(meta.read_bytes())
        except FileNotFoundError as exc:
            raise NotFound(f"no such chunk {h:016x}") from exc

    # ------------------------------------------------------------------ chunk I/O

    def write(self, h: int, offset: int, data: bytes | list[bytes], version: int, sync: bool = True) -> int:
        """Write ``data`` (bytes, or a piece's parts as received: written with one ``pwritev``
        and checksummed part by part, never joined into one more copy) at ``offset`` (≤ current
        length; the chunk is truncated after it)."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        with self.lock(h):
            w = self._open(h, offset, version, sum(len(p) for p in parts))
            try:
                w.feed(parts)
                return self._finish(w, sync)
            finally:
                w.close()

    def writer(self, h: int, offset: int, version: int, expect: int) -> ChunkWriter:
        """A piece written as it arrives (``feed`` its parts, then ``finish``): the chunkserver
        uses it for a piece that extends the chunk, so the disk writes while the network still
        delivers. Only ``finish`` changes what the chunk is (its length and CRCs, in memory or
        durably); a writer that is closed without it leaves bytes past the chunk's length, which
        the next write overwrites and a restart truncates. The caller runs one writer per chunk
        at a time (kubegfs/chunkserver/server.py's turnstile)."""
        with self.lock(h):
            return self._open(h, offset, version, expect)

    def finish(self, w: ChunkWriter, sync: bool) -> int:
        """Make a writer's bytes part of the chunk (after an ``fdatasync`` with ``sync``)."""
        with self.lock(h := w.h):
            cur = self.index.get(h)
            if (cur[1] if cur else None) != w.base_length or os.fstat(w.fd).st_nlink == 0:
                raise Conflict(f"chunk {h:016x} changed while a piece was being written")
            return self._finish(w, sync)

    def _open(self, h: int, offset: int, version: int, expect: int) -> ChunkWriter:
        """Validate a write and open its file (caller holds the chunk's lock)."""
        if offset + expect > self.chunk_size:
            raise InvalidArgument(f"write past the chunk size ({offset + expect} > {self.chunk_size})")
        data_path, _ = self._paths(h)
        cur = self.index.get(h)
        if cur is None:
            if offset != 0:
                raise InvalidArgument("a new chunk must be written from offset 0")
            data_path.parent.mkdir(parents=True, exist_ok=True)
            crcs = array("I")
            length = 0
        else:
            cur_v, length, crcs = self._meta(h)
            if version < cur_v:
                raise Conflict(f"stale write: version {version} < stored {cur_v}")
            if offset > length:
                raise InvalidArgument(f"write at {offset} leaves a gap after length {length}")
        first = offset // BLOCK_SIZE
        head = offset - first * BLOCK_SIZE
        claim = self._claim(max(0, offset + expect - length) + (0 if cur else NEW_FILES))
        claim.__enter__()
        fd = -1
        try:
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
            prefix = b""
            if head:
                prefix = os.pread(fd, head, first * BLOCK_SIZE)
                if len(prefix) != head:
                    raise CorruptData("short chunk file")
                old_len = min(BLOCK_SIZE, length - first * BLOCK_SIZE)
                old = prefix + os.pread(fd, old_len - head, offset) if old_len > head else prefix
                if first < len(crcs) and crc32(old) != crcs[first]:
                    self.corrupt.add(h)
                    raise CorruptData(f"chunk {h:016x} block {first} is corrupt")
            kept = array("I", crcs[:first])  # readers may hold the pending array: never change it
            return ChunkWriter(h, fd, offset, version, length if cur else None, kept, prefix, claim)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            claim.__exit__(None, None, None)
            raise

    def _finish(self, w: ChunkWriter, sync: bool) -> int:
        """(caller holds the chunk's lock)"""
        _, meta_path = self._paths(w.h)
        with disk_full_is_no_space():
            os.ftruncate(w.fd, w.pos)
            if sync:
                os.fdatasync(w.fd)
        crcs = w.crcs.done()
        cur = self.index.get(w.h)
        new_v = max(w.version, cur[0] if cur else 0)
        if sync:
            self._write_meta(meta_path, new_v, w.pos, crcs)
            self._pending.pop(w.h, None)
        else:
            self._pending[w.h] = (new_v, w.pos, crcs)
        self._index_set(w.h, new_v, w.pos)
        return w.pos

    def _readable(self, h: int, offset: int, min_version: int) -> tuple[int, int, array]:
        """The version, length and CRCs of a chunk about to be read at ``offset``: Conflict for
        a replica older than ``min_version``, InvalidArgument for an offset past its end."""
        v, size, crcs = self._meta(h)
        if v < min_version:
            raise Conflict(f"stale replica: version {v} < {min_version}")
        if offset > size:
            raise InvalidArgument(f"offset {offset} beyond chunk length {size}")
        return v, size, crcs

    def read(self, h: int, offset: int, length: int, min_version: int = 0) -> bytes:
        """Read and verify; raises CorruptData (and remembers the chunk) on a checksum failure."""
        data_path, _ = self._paths(h)
        _, size, crcs = self._readable(h, offset, min_version)
        end = min(size, offset + length)
        first, count = rangecrc.covering(offset, length, size)
        base, span = rangecrc.span(first, count, size)
        fd = os.open(data_path, os.O_RDONLY)
        try:
            buf = os.pread(fd, span, base) if span > 0 else b""  # whole blocks, one call, one copy
        finally:
            os.close(fd)
        view = memoryview(buf)
        try:  # the client's check of a client-verified read, here: a short file or missing CRCs fail it too
            rangecrc.check(view, base, size, crcs[first : first + count])
        except CorruptData as exc:
            self.corrupt.add(h)
            raise CorruptData(f"chunk {h:016x}: {exc.message}") from None
        start = offset - base
        if start == 0 and end - offset == len(buf):
            return buf
        return bytes(view[start : start + (end - offset)])

    def open_range(self, h: int, offset: int, length: int, min_version: int = 0) -> ReadRange:
        """A client-verified read (rangecrc.py): the chunk file opened and where the whole blocks
        covering the range are in it, with their stored CRCs; the caller sends those bytes and
        closes the file. Nothing is read or checked here: the client checks every block. Refused
        as ``read`` refuses (a stale version, an offset past the end, no such chunk); a file
        shorter than its metadata says, or CRCs missing, is CorruptData (and remembered)."""
        data_path, _ = self._paths(h)
        v, size, crcs = self._readable(h, offset, min_version)
        first, count = rangecrc.covering(offset, length, size)
        base, n = rangecrc.span(first, count, size)
        if first + count > len(crcs):
            self.corrupt.add(h)
            raise CorruptData(f"chunk {h:016x} lacks the CRCs of blocks {first}–{first + count - 1}")
        fd = os.open(data_path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < base + n:
                self.corrupt.add(h)
                raise CorruptData(f"chunk {h:016x}'s file is shorter than its length {size}")
        except BaseException:
            os.close(fd)
            raise
        return ReadRange(fd, base, n, crcs[first : first + count].tolist(), size, v)

    def open_local(self, h: int, min_version: int) -> tuple[int, int, int, array]:
        """A short-circuit read's grant (kubegfs/chunkserver/shortcircuit.py): the chunk file
        opened ``O_RDONLY`` (a handle the store knows, never a path from the caller) with its
        durable version, length and block CRCs, all taken under the chunk's lock, so no write
        can finish between reading the metadata and opening the file. Returns (fd, version,
        length, CRCs); the caller sends and closes the fd. Refused as ``read`` refuses (no such
        chunk, a stale version); a file shorter than its metadata, or CRCs missing, is
        CorruptData (and remembered)."""
        data_path, _ = self._paths(h)
        with self.lock(h):
            if h not in self.index:
                raise NotFound(f"no such chunk {h:016x}")
            v, size, crcs = self._read_meta(h)  # the durable state (a pending write is not in it)
            if v < min_version:
                raise Conflict(f"stale replica: version {v} < {min_version}")
            if len(crcs) < -(-size // BLOCK_SIZE):
                self.corrupt.add(h)
                raise CorruptData(f"chunk {h:016x} lacks block CRCs")
            fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size < size:
                    self.corrupt.add(h)
                    raise CorruptData(f"chunk {h:016x}'s file is shorter than its length {size}")
            except BaseException:
                os.close(fd)
                raise
        return fd, v, size, crcs

    def verify(self, h: int) -> bool:
        try:
            _, size, _ = self._meta(h)
            self.read(h, 0, size)
            return True
        except CorruptData:
            return False

    def clone(self, src: int, dst: int, version: int) -> None:
        """Copy-on-write: a local copy of ``src`` as ``dst`` (no network)."""
        s_data, s_meta = self._paths(src)
        d_data, d_meta = self._paths(dst)
        with self.lock(src):
            if src not in self.index:
                raise NotFound(f"no such chunk {src:016x}")
            if dst in self.index:
                return  # idempotent
            d_data.parent.mkdir(parents=True, exist_ok=True)
            tmp = d_data.with_suffix(".chk.tmp")
            _, length, crcs = self._meta(src)
            _copy(s_data, tmp, length)
            os.replace(tmp, d_data)
            self._write_meta(d_meta, version, length, crcs)
            self._index_set(dst, version, length)

    def set_version(self, h: int, version: int) -> None:
        """The master's new version for a chunk about to be mutated (GFS: at lease grant), so a
        replica that misses the mutation is recognisably stale."""
        _, meta = self._paths(h)
        with self.lock(h):
            self._make_durable(h)
            v, length, crcs = self._read_meta(h)
            if version < v:
                raise Conflict(f"version {version} is older than the stored {v}")
            if version != v:
                self._write_meta(meta, version, length, crcs)
                self._index_set(h, version, length)

    def delete(self, h: int) -> None:
        d, m = self._paths(h)
        with self.lock(h):
            m.unlink(missing_ok=True)
            d.unlink(missing_ok=True)
            self._pending.pop(h, None)
            old = self.index.pop(h, None)
            if old is not None:
                self.chunk_bytes -= old[1]
            self.corrupt.discard(h)
        with self._lock:
            self._locks.pop(h, None)

    # ------------------------------------------------------------------ records

    def _rec_paths(self, rid: str) -> tuple[Path, Path]:
        return self.records_dir / f"{rid}.rec", self.records_dir / f"{rid}.sha256"

    def put_record(self, rid: str, pieces: Iterator[bytes], expected_sha256: str,
                   store: Callable[[LogRecord], object] | None = None) -> tuple[int, str]:
        """Store a snapshot record, verified against ``expected_sha256`` first, in the log
        (blocks.py): alone, or by ``store`` (which appends the blocks the record reaches and the
        record after them in one synced write: the record is never there without them). What an
        earlier version left under this id as files goes."""
        h = hashlib.sha256()
        parts: list[bytes] = []
        for p in pieces:
            h.update(p)
            parts.append(p)
        digest = h.hexdigest()
        if digest != expected_sha256:
            raise CorruptData(f"record checksum mismatch: got {digest}, header said {expected_sha256}")
        rec = LogRecord(rid, digest, b"".join(parts))
        with disk_full_is_no_space():
            if store is None:
                self.log.put_record(rec)
            else:
                store(rec)
        for f in self._rec_paths(rid):
            f.unlink(missing_ok=True)
        n = len(rec.data)
        self.record_sizes[rid] = n
        with self._digests_lock:
            if self._digests is not None:
                self._digests[rid] = [n, digest]
        return n, digest

    def record(self, rid: str) -> tuple[bytes | Path, str]:
        """A record (its bytes if it is in the log, its file if an earlier version stored it)
        and the sha256 stored with it; NotFound if there is none."""
        try:
            return self.log.read_record(rid)
        except KeyError:
            pass
        rec, sha_path = self._rec_paths(rid)
        try:
            if rec.exists():
                return rec, sha_path.read_text().strip()
        except FileNotFoundError:
            pass
        raise NotFound(f"no such snapshot record: {rid}")

    def verify_record(self, rid: str) -> bool:
        return self.record_matches(*self.record(rid))

    @staticmethod
    def record_matches(src: bytes | Path, sha: str) -> bool:
        """Whether a record as ``record`` gave it (its bytes, or its file) has the sha256 ``sha``."""
        if isinstance(src, bytes):
            return hashlib.sha256(src).hexdigest() == sha
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
        return h.hexdigest() == sha

    def delete_record(self, rid: str) -> None:
        self.log.delete_record(rid)
        rec, sha = self._rec_paths(rid)
        rec.unlink(missing_ok=True)
        sha.unlink(missing_ok=True)
        self.record_sizes.pop(rid, None)
        with self._digests_lock:
            if self._digests is not None:
                self._digests.pop(rid, None)

    def list_records(self) -> list[str]:
        return sorted({p.stem for p in self.records_dir.glob("*.rec")} | set(self.log.records))

    def record_digests(self, scan: bool = True) -> dict[str, list[int | str]]:
        """Each record's size and the sha256 stored with it: the master compares them with its
        catalog, so a copy lost, or a record file of an earlier version truncated or holding
        another record's bytes, is noticed by a heartbeat, not only by a full scrub. The log's
        records come from memory (bytes damaged in the log show when the record is read,
        checked by the heartbeats' records pass (server.RECORD_CHECK_COUNT of them a pass, in
        turn) or scrubbed). The files: ("" for a sha256 while a sidecar is missing) with ``scan``, one
        pass of the directory's entries and their stats; a sidecar is read again only when its
        stat (inode, mtime, size) changed since the last pass, so a pass at a thousand records
        costs stats (~6 ms), not a thousand file reads (~20 ms). Refreshes ``record_sizes``.
        Without ``scan`` (after a first pass): the last pass's, with the records stored and
        deleted here since, and no disk access (a copy damaged outside shows at the next pass)."""
        if not scan:
            with self._digests_lock:
                if self._digests is not None:
                    return dict(self._digests)
        with self._digests_lock:  # (a put or delete finishing meanwhile updates the pass's result)
            out = self._scan_digests()
            self._digests = dict(out)
        return out

    def _scan_digests(self) -> dict[str, list[int | str]]:
        sizes: dict[str, int] = {}
        sides: dict[str, tuple[int, int, int]] = {}
        with os.scandir(self.records_dir) as entries:
            for e in entries:
                rid, _, ext = e.name.rpartition(".")
                if ext not in ("rec", "sha256"):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if ext == "rec":
                    sizes[rid] = st.st_size
                else:
                    sides[rid] = (st.st_ino, st.st_mtime_ns, st.st_size)
        known, seen = self._sidecars, {}
        out: dict[str, list[int | str]] = {}
        for rid, size in sizes.items():
            sha, key = "", sides.get(rid)
            if key is not None:
                hit = known.get(rid)
                if hit is not None and hit[0] == key:
                    sha = hit[1]
                else:
                    try:
                        sha = (self.records_dir / f"{rid}.sha256").read_bytes().decode("ascii", "replace").strip()
                    except FileNotFoundError:
                        key = None
                if key is not None:
                    seen[rid] = (key, sha)
            out[rid] = [size, sha]
        for rid, r in list(self.log.records.items()):  # the log's copy is the one served
            out[rid] = [r.length, r.sha256]
            sizes[rid] = r.length
        self._sidecars, self.record_sizes = seen, sizes
        return out


@contextlib.contextmanager
def disk_full_is_no_space() -> Iterator[None]:
    """A full disk (ENOSPC) is the caller's NoSpace, not an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpace("chunkserver disk is full") from exc
        raise


class BlockCrcs:
    """The CRC32 of each BLOCK_SIZE block of a byte stream fed in any cuts (the last block may
    be short), computed incrementally across the cuts, without concatenating."""

    def __init__(self, kept: array | None = None) -> None:
        self.out = kept if kept is not None else array("I")
        self.crc = self.fill = 0

    def update(self, p: bytes | bytearray | memoryview) -> None:
        mv = memoryview(p)
        while mv:
            take = min(BLOCK_SIZE - self.fill, len(mv))
            self.crc = crc32(mv[:take], self.crc)
            self.fill += take
            mv = mv[take:]
            if self.fill == BLOCK_SIZE:
                self.out.append(self.crc)
                self.crc = self.fill = 0

    def done(self) -> array:
        """The CRCs so far, the partial last block's included (the stream may go on)."""
        out = array("I", self.out)
        if self.fill:
            out.append(self.crc)
        return out


def block_crcs(parts: list[bytes]) -> array:
    """The CRC32 of each BLOCK_SIZE block of the concatenation of ``parts``."""
    c = BlockCrcs()
    for p in parts:
        c.update(p)
    return c.done()


class ReadRange:
    """An open chunk file and the whole blocks of it a client-verified read sends (``open_range``)."""

    __slots__ = ("fd", "base", "length", "crcs", "size", "version")

    def __init__(self, fd: int, base: int, length: int, crcs: list[int], size: int, version: int) -> None:
        self.fd = fd
        self.base = base  # where the blocks start in the chunk
        self.length = length  # how many bytes they are
        self.crcs = crcs  # their stored CRC32s
        self.size = size  # the chunk's length
        self.version = version


class ChunkWriter:
    """One piece being written into a chunk file at ``pos`` (see ``ChunkStore.writer``)."""

    def __init__(self, h: int, fd: int, offset: int, version: int, base_length: int | None, kept: array, prefix: bytes,
                 claim: contextlib.AbstractContextManager[None]) -> None:
        self.h = h
        self.fd = fd
        self.pos = offset
        self.version = version
        self.base_length = base_length  # the chunk's length when it was opened (None: new)
        self.crcs = BlockCrcs(kept)
        if prefix:
            self.crcs.update(prefix)
        self._claim = claim
        self._open = True

    def feed(self, parts: list[bytes]) -> None:
        """Write the next parts (one ``pwritev``) and checksum them."""
        with disk_full_is_no_space():
            pwrite_all(self.fd, parts, self.pos)
        start = self.pos
        for p in parts:
            self.crcs.update(p)
            self.pos += len(p)
        start_writeback(self.fd, start, self.pos - start)

    def close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)
            self._claim.__exit__(None, None, None)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing a just-written range to disk, without waiting (Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; HDFS's ``dfs.datanode.sync.behind.writes``).
    A streamed piece's bytes then reach the disk while the rest of the chunk arrives, instead of
    all at once in the fdatasync before the chunk's last answer; the fdatasync still decides
    durability (this promises nothing)."""
    if _SYNC_FILE_RANGE is not None and n > 0:
        _SYNC_FILE_RANGE(fd, offset, n, SYNC_FILE_RANGE_WRITE)


def _copy(src: Path, dst: Path, size: int) -> None:
    """Copy the first ``size`` bytes of a file, preferring a kernel-side copy (reflink on
    filesystems that can)."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        try:
            done = 0
            while done < size:
                n = os.copy_file_range(fs.fileno(), fd.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError:
            fs.seek(0)
            fd.seek(0)
            fd.truncate()
            left = size
            while left > 0 and (piece := fs.read(min(left, 1 << 20))):
                fd.write(piece)
                left -= len(piece)
        fd.flush()
        os.fsync(fd.fileno())
