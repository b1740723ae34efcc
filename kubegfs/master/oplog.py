"""Durability for the master: an fsynced, checksummed operation log with group commit, periodic
checkpoints written off the event loop, and recovery = newest good checkpoint + log replay.

Files in the data directory:
  ``log-<first seq, 20 digits>.wal``   framed msgpack op records (see formats.frame)
  ``checkpoint-<seq, 20 digits>.ckpt`` encoded MasterState as of op ``seq``
A torn or corrupt record stops replay at the last good record; the damaged file is kept beside as
``*.corrupt-<unix time>`` and the log is truncated to the good prefix, with an ERROR log line.
Zeros after the last record are cut off without complaint: appends go after the records.

The segment being appended to is pre-filled, as a chunkserver's copy is (``chunkserver/metastore``,
HDFS's edit log does the same): zeros are written ``PREFILL_BYTES`` ahead of the records, with
the batch that needs them and under the same fdatasync, and later batches overwrite them in place
(``pwrite`` at the records' end, not ``O_APPEND``), so a batch's fdatasync flushes its data alone
and needs no ext4 journal commit for a new size or new blocks (the copies' fdatasyncs on the same
disk would queue behind that commit). So the file size is not the records' end: it is found by
their framing (``scan_log`` with ``padded``: a zero header with only zeros after it), and every
reader of a segment scans it that way (``recover``, ``metareplica.read_batches`` and
``local_digest``); ``recover`` cuts every segment to its records' end, ``rotate`` and ``close``
cut the segment they leave. A crash leaves records, then perhaps a torn batch (part of it over
the zeros, pages in any order), then zeros: recovery keeps every record before the first bad or
zero header and treats anything non-zero after that as a torn tail (``.corrupt`` copy, cut).

Invariants of :class:`OpLog`:
  * ``durable_seq`` is the highest seq whose record was written *and* synced; it only grows, and
    every op at or below it survives a crash. An op above it may vanish in a crash even though
    ``MasterState`` already applied it, so nothing may leave the master on its strength alone
    (see ``outbox.py``: deletions wait for ``durable_seq``).
  * ``sync`` (default ``os.fdatasync``) is the one place the log waits for the disk. It is a seam:
    tests pass one that blocks on an event to hold ops between "applied" and "durable", and the
    ``--debug-fsync-delay`` option wraps it to act like a slow disk.
  * A failed write or sync is fatal: every waiter gets the error, ``failed`` is set, nothing is
    written after it and ``durable_seq`` never advances again; the master must restart (and
    ``close`` then leaves the segment as it is, zeros and all, for ``recover``).
  * ``_end`` is the records' end in the open segment (the next batch is written there), and
    zeros follow it up to ``_filled``; only the flush loop's worker thread moves them, one batch
    at a time, and the segment is opened only at its records' end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

from ..errors import CorruptData
from ..formats import frame, packb, scan_log
from ..fsutil import atomic_write, fsync_dir
from ..metalayout import prune_superseded, segment_name, write_over_zeros
from .checkpoint import decode_checkpoint, encode_checkpoint
from .ops import Op
from .state import MasterState

log = logging.getLogger("kubegfs.master.oplog")


@dataclass
class RecoveryReport:
    checkpoint_seq: int = 0
    replayed: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def recover(data_dir: Path, chunk_size: int, replication: int) -> tuple[MasterState, RecoveryReport]:
    """Load the newest checkpoint that decodes, then replay every logged op after it."""
    t0 = time.perf_counter()
    rep = RecoveryReport()
    data_dir.mkdir(parents=True, exist_ok=True)
    state: MasterState | None = None
    for ck in sorted(data_dir.glob("checkpoint-*.ckpt"), reverse=True):
        try:
            state = decode_checkpoint(ck.read_bytes())
            rep.checkpoint_seq = state.seq
            break
        except (CorruptData, KeyError, TypeError, ValueError) as exc:
            msg = f"checkpoint {ck.name} is corrupt ({exc}); trying an older one"
            log.error(msg)
            rep.problems.append(msg)
            ck.rename(ck.with_name(ck.name + f".corrupt-{int(time.time())}"))
    if state is None:
        state = MasterState(chunk_size, replication)
    segments = sorted(data_dir.glob("log-*.wal"))
    stop = False
    for seg in segments:
        if stop:
            msg = f"log segment {seg.name} follows a damaged one; set aside"
            log.error(msg)
            rep.problems.append(msg)
            seg.rename(seg.with_name(seg.name + f".corrupt-{int(time.time())}"))
            continue
        data = seg.read_bytes()
        scan = scan_log(data, padded=True)
        for op in scan.records:
            if not isinstance(op, dict) or "seq" not in op or "op" not in op:
                scan.problem = scan.problem or "record without seq/op"
                break
            if op["seq"] <= state.seq:
                continue
            if op["seq"] != state.seq + 1:
                scan.problem = f"sequence gap: expected {state.seq + 1}, found {op['seq']}"
                break
            state.apply(cast(Op, op))  # a decoded record: apply rejects a kind it does not know
            rep.replayed += 1
        if scan.problem:
            msg = (
                f"operation log {seg.name}: {scan.problem}; recovered to the last good record "
                f"(seq {state.seq}); damaged copy kept"
            )
            log.error(msg)
            rep.problems.append(msg)
            keep = seg.with_name(seg.name + f".corrupt-{int(time.time())}")
            keep.write_bytes(data)
            stop = True
        if scan.good_bytes < len(data):  # cut back to the last good record (or a zero tail off)
            with open(seg, "r+b") as f:
                f.truncate(scan.good_bytes)
                os.fsync(f.fileno())
    rep.seconds = time.perf_counter() - t0
    return state, rep


PREFILL_BYTES = 2 << 20  # zeros kept ahead of the records in the open segment

# sync: the longest a batch waits for the clients the previous one answered (``_gather``)
COMMIT_DELAY = 0.002


class Shipment(Protocol):
    """A batch on its way to the metadata copies (``metareplica``)."""

    fut: asyncio.Future[None]  # done once the copies hold it
    wait: bool  # its ops are answered only then (sync), not at the local fsync

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the copies hold it, in the step that learns it (now if they do)."""


class OpLog:
    """Appends ops with group commit: the ops that arrive while a batch is written share the
    next write + fsync. With replication that waits for the copies (``sync``) the next batch
    also waits until the copies hold this one (one batch in flight, as HDFS's edit log has one
    sync at a time), so it holds the ops of the whole round trip in one write and one send."""

    def __init__(self, data_dir: Path, next_seq: int, fsync: bool = True,
                 sync: Callable[[int], None] | None = None) -> None:
        self.dir = data_dir
        self.next_seq = next_seq
        self.durable_seq = next_seq - 1  # everything recovered is on disk already
        self.sync: Callable[[int], None] | None = (sync or os.fdatasync) if fsync else None
        self._buf: list[bytes] = []
        self._buf_last_seq = self.durable_seq
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing = False
        self._end = self._filled = 0  # the open segment's records' end, and its zeros' end
        self._fd = self._open_segment(next_seq)
        self.failed: BaseException | None = None
        self.on_durable: list[Callable[[int], None]] = []  # called with the new durable_seq
        self._flushed_last = self.durable_seq
        self._want = 0  # ``_gather``: the next batch goes once this many ops are queued ...
        self._more: asyncio.Future[None] | None = None  # ... which sets this
        # metadata replication (metareplica.py): called with each group-committed batch (framed
        # bytes, first seq, last seq) as it is written here; returns None (local only) or a
        # ``Shipment`` of the batch to the copies. Either way ``durable_seq`` (what deletions
        # wait for) advances only once the copies have it.
        self.replicate: Callable[[bytes, int, int], Shipment | None] | None = None

    def _open_segment(self, first_seq: int) -> int:
        # reuse the newest segment if it exists (append after recovery)
        segs = sorted(self.dir.glob("log-*.wal"))
        return self._open(segs[-1] if segs else self.dir / segment_name(first_seq))

    def _open(self, path: Path) -> int:
        """Open ``path`` to append at its records' end (``_end``; zeros may follow to ``_filled``)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._filled = os.fstat(fd).st_size
            self._end = _records_end(fd, path, self._filled)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def stamp(self, op: Op) -> Op:
        op["seq"] = self.next_seq
        self.next_seq += 1
        return op

    def enqueue(self, op: Op) -> asyncio.Future[None]:
        """Queue an already-applied op (with its seq); the future resolves once it is durable."""
        if self.failed is not None:
            raise RuntimeError(f"operation log failed earlier: {self.failed}")
        rec = {k: v for k, v in op.items() if not k.startswith("_")}
        self._buf.append(frame(packb(rec)))
        self._buf_last_seq = op["seq"]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._more is not None and len(self._buf) >= self._want and not self._more.done():
            self._more.set_result(None)  # enough ops for the next batch (``_gather``)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_loop())
        return fut

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._buf:
                buf, waiters, last = self._buf, self._waiters, self._buf_last_seq
                self._buf, self._waiters = [], []
                first = self._flushed_last + 1
                self._flushed_last = last
                data = b"".join(buf)
                t0 = loop.time()
                # the copies get the batch while it is written here (GFS: local and remote log
                # writes in parallel); the waiters are answered when both are durable
                remote = self.replicate(data, first, last) if self.replicate is not None else None
                try:
                    await loop.run_in_executor(None, self._write, data)
                except BaseException as exc:  # noqa: BLE001 - a failed fsync is fatal
                    self.failed = exc
                    log.critical("operation log write failed: %s; the master must restart", exc)
                    for w in waiters + self._waiters:
                        if not w.done():
                            w.set_exception(RuntimeError(f"operation log write failed: {exc}"))
                    self._buf, self._waiters = [], []
                    raise
                self._settle(last, waiters, remote)
                if remote is not None and remote.wait and not remote.fut.done():
                    # sync: one batch in flight to the copies. What arrives meanwhile goes out
                    # in the next write and send, so a batch holds more ops and each costs the
                    # master and the copies their per-batch work fewer times
                    await asyncio.wait([remote.fut])
                    await self._gather(len(waiters), loop.time() - t0)
        finally:
            self._flushing = False

    async def _gather(self, answered: int, took: float) -> None:
        """``sync``, once a batch of several ops is answered (``took`` seconds after it was
        made): wait until half of the clients it answered sent their next op, so that those ops
        share the next batch rather than each group of them taking one of its own; for at most
        ``COMMIT_DELAY`` and never longer than the batch took, so the wait adds at most one round
        trip to an op's. It is PostgreSQL's ``commit_delay``, which applies only while other
        transactions are active: a lone writer never waits."""
        if answered < 2:
            return
        self._want = len(self._buf) + (answered + 1) // 2
        self._more = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([self._more], timeout=min(COMMIT_DELAY, took))
        finally:
            self._want, self._more = 0, None

    def _settle(self, last: int, waiters: list[asyncio.Future[None]], remote: Shipment | None) -> None:
        """The batch ending at ``last`` is durable here: answer its waiters and advance
        ``durable_seq`` now, or when the copies have it too (see ``replicate``)."""
        if remote is None:
            self._durable(last, waiters)
            return
        if not remote.wait:
            _answer(waiters)
            waiters = []
        remote.then(partial(self._durable, last, waiters))

    def _durable(self, last: int, waiters: list[asyncio.Future[None]]) -> None:
        self.durable_seq = max(self.durable_seq, last)
        for cb in self.on_durable:
            cb(self.durable_seq)
        _answer(waiters)

    def _write(self, data: bytes) -> None:
        self._filled = write_over_zeros(self._fd, data, self._end, self._filled, PREFILL_BYTES)
        self._end += len(data)
        if self.sync is not None:
            self.sync(self._fd)

    async def wait_durable(self, seq: int) -> None:
        """Return once op ``seq`` (and all before it) is durable; raise if the log failed."""
        while self.durable_seq < seq:
            if self.failed is not None:
                raise RuntimeError(f"operation log failed earlier: {self.failed}")
            await asyncio.sleep(0.005)

    async def drain(self) -> None:
        while self._flushing or self._buf:
            await asyncio.sleep(0.001)

    async def rotate(self) -> None:
        """Start a new segment at ``next_seq`` (called when a checkpoint is pinned); the one
        left is cut to its records (not synced: a crash leaves its zeros, which ``recover``
        cuts)."""
        await self.drain()
        self.close()
        self._fd = self._open(self.dir / segment_name(self.next_seq))

    def close(self) -> None:
        """Close the open segment, cut to its records unless the log failed (once: the closed
        descriptor's number is never used again, it may belong to another file by then)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if self.failed is None:
                os.ftruncate(fd, self._end)
        except OSError:
            pass
        finally:
            os.close(fd)


def _records_end(fd: int, path: Path, size: int) -> int:
    """The end of the records in a segment of ``size`` bytes: its size, unless zeros follow
    them (a segment left open by a crash or a kill; ``recover`` cuts them first)."""
    if not size or os.pread(fd, 1, size - 1) != b"\0":
        return size
    scan = scan_log(path.read_bytes(), padded=True)
    if scan.problem:
        raise CorruptData(f"operation log {path.name}: {scan.problem}; recover() it before appending")
    return scan.good_bytes


def _answer(waiters: list[asyncio.Future[None]], _done: object = None) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)


def write_checkpoint(data_dir: Path, view: dict[str, Any], keep: int = 2) -> Path:
    """Encode + write a checkpoint (runs in a worker thread), then prune what it supersedes."""
    data = encode_checkpoint(view)
    path = data_dir / f"checkpoint-{view['seq']:020d}.ckpt"
    atomic_write(path, data)
    prune_superseded(data_dir, keep)
    return path
