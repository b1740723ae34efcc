"""A chunkserver's copy of the master's metadata: checkpoints and op-log records it was sent.

Layout under ``<data>/meta/`` is the master's own (``metalayout``), plus ``meta.json``:
``history`` (which log lineage this copy follows: a master rebuilt from records starts a new one)
and ``base`` (the seq the copy starts after: its first checkpoint's, or 0).

Invariants: the copy is always *complete*: a checkpoint (or base 0) and then every record up to
``last_seq`` without a gap, each batch verified (sha256 of the body, CRC and seq of every
record) and fdatasynced before it is acknowledged. Anything else is refused with 409 and the
copy's position, and the master re-sends or starts the copy over (``reset``).

The segment being appended to is pre-filled: zeros are written ``PREFILL_BYTES`` ahead of the
records (with the batch that needs them, under the same fdatasync) and the records then
overwrite them in place, so the fdatasync of a batch flushes its data alone and needs no
journal commit for a new size or new blocks (on a disk the master's log shares, those commits
queue behind each other). The end of the records is found by their framing (``scan_log`` with
``padded``), never the file size: at start every segment is cut back to its last good record
(a zero tail or a torn batch goes), and a segment is cut to its records' end when the next one
starts; ``log_extent`` says how much of each segment is records, for readers.
All methods are blocking; the server calls them from worker threads (``log_extent`` too may be
called from the event loop).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import Conflict, CorruptData, NotFound
from ..formats import frame, packb, record_digest, scan_log, sha256_hex
from ..fsutil import atomic_write, fsync_dir
from ..metalayout import checkpoint_name, prune_superseded, segment_name, seq_of, write_over_zeros

PREFILL_BYTES = 2 << 20  # zeros kept ahead of the records in the open segment


class LogBatch(NamedTuple):
    first: int
    last: int
    data: bytes  # framed records first..last
    sha256: str  # of ``data``, hex


class MetaStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "meta"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        info = self.dir / "meta.json"
        saved: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}
        self.history = str(saved.get("history", ""))
        self.base = int(saved.get("base", 0))
        self.last_digest = ""  # record_digest of the record at last_seq ("" when that is base)
        self.last_seq = self._scan_last()
        self._new_segment = True  # the next append opens a segment named after its first record
        self._fd: int | None = None
        self._end = 0  # bytes of records in the open segment; zeros follow up to ``_filled``
        self._filled = 0
        self._open: tuple[Path, int] | None = None  # (open segment, _end) for readers, set at once
        self._switch = threading.Lock()  # held while the open segment changes (``log_extent``)

    def _scan_last(self) -> int:
        """The last good record's seq; a torn tail (a crash mid-append) is cut off."""
        last = max([self.base] + [seq_of(c) for c in self.dir.glob("checkpoint-*.ckpt")])
        for seg in sorted(self.dir.glob("log-*.wal")):
            data = seg.read_bytes()
            scan = scan_log(data, padded=True)
            for rec in scan.records:
                if isinstance(rec, dict) and isinstance(rec.get("seq"), int) and rec["seq"] > last:
                    last = rec["seq"]
                    self.last_digest = record_digest(rec)
            if scan.good_bytes < len(data):  # a zero tail (pre-filled) or a torn batch
                with open(seg, "r+b") as f:
                    f.truncate(scan.good_bytes)
                    os.fsync(f.fileno())
        return last

    def inventory(self) -> dict[str, Any]:
        cks = []
        for c in sorted(self.dir.glob("checkpoint-*.ckpt")):
            sha = c.with_suffix(".sha256")
            if sha.exists():
                cks.append({"seq": seq_of(c), "sha256": sha.read_text().strip(), "bytes": c.stat().st_size})
        segs = [{"first": seq_of(s), "bytes": n} for s, n in self.log_extent()]
        return {"history": self.history, "base": self.base, "last_seq": self.last_seq,
                "last_digest": self.last_digest,
                "checkpoints": cks, "segments": segs}

    def _save_info(self) -> None:
        atomic_write(self.dir / "meta.json", json.dumps({"history": self.history, "base": self.base}).encode())

    def reset(self, history: str, base: int) -> None:
        """Start the copy over for ``history``: it will hold everything after ``base``."""
        with self._lock:
            self._close()
            shutil.rmtree(self.dir)
            self.dir.mkdir()
            self.history, self.base, self.last_seq, self.last_digest = history, base, base, ""
            self._save_info()
            fsync_dir(self.dir.parent)
            self._new_segment = True

    def _check_history(self, history: str) -> None:
        if history != self.history:
            raise Conflict(f"metadata copy follows history {self.history or '(none)'}, not {history}",
                           last_seq=self.last_seq, history=self.history)

    def put_checkpoint(self, history: str, seq: int, data: bytes, sha256: str) -> None:
        with self._lock:
            self._check_history(history)
            if sha256_hex(data) != sha256:
                raise CorruptData("checkpoint sha256 mismatch")
            if seq > self.last_seq:
                raise Conflict(f"checkpoint {seq} is ahead of this copy's log ({self.last_seq})",
                               last_seq=self.last_seq, history=self.history)
            path = self.dir / checkpoint_name(seq)
            atomic_write(path.with_suffix(".sha256"), sha256.encode())
            atomic_write(path, data)
            self._new_segment = True
            prune_superseded(self.dir)

    def append(self, history: str, first: int, last: int, data: bytes, sha256: str) -> int:
        """Append records ``first..last`` (framed). Records the copy holds already are skipped
        (a batch may overlap what a bootstrap sent); a gap is refused."""
        return self.append_many(history, [LogBatch(first, last, data, sha256)])

    def append_many(self, history: str, batches: list[LogBatch]) -> int:
        """Append consecutive batches with one write and one fdatasync (group commit for the
        stream, ``metaapi``): every batch is verified first, and a bad one refuses them all."""
        with self._lock:
            self._check_history(history)
            out: list[bytes] = []
            last_seq, digest = self.last_seq, self.last_digest
            for b in batches:
                if b.last <= last_seq:
                    continue
                if b.first > last_seq + 1:
                    raise Conflict(f"metadata copy is at seq {last_seq}, batch starts at {b.first}",
                                   last_seq=self.last_seq, history=self.history)
                if sha256_hex(b.data) != b.sha256:
                    raise CorruptData("op-log batch sha256 mismatch")
                scan = scan_log(b.data)
                seqs = [r.get("seq") if isinstance(r, dict) else None for r in scan.records]
                if scan.problem or seqs != list(range(b.first, b.last + 1)):
                    raise CorruptData(f"op-log batch {b.first}..{b.last} is damaged or out of order ({scan.problem})")
                if b.first <= last_seq:
                    out.append(b"".join(frame(packb(r)) for r in scan.records if r["seq"] > last_seq))
                else:
                    out.append(b.data)
                last_seq, digest = b.last, record_digest(scan.records[-1])
            if last_seq == self.last_seq:
                return last_seq
            fd, path = self._segment(self.last_seq + 1)
            data = b"".join(out)
            end = self._end + len(data)
            self._filled = write_over_zeros(fd, data, self._end, self._filled, PREFILL_BYTES)
            os.fdatasync(fd)
            self._end = end
            self._open = (path, end)
            self.last_seq, self.last_digest = last_seq, digest
            return last_seq

    def _segment(self, first: int) -> tuple[int, Path]:
        """The open segment to append to; a new one (named after ``first``, its first record)
        after a checkpoint, a reset or a restart."""
        if self._fd is not None and self._open is not None and not self._new_segment:
            return self._fd, self._open[0]
        self._close()
        path = self.dir / segment_name(first)
        with self._switch:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            self._end = self._filled = os.fstat(self._fd).st_size  # 0, or records only (cut at start)
            self._open = (path, self._end)
        self._new_segment = False
        fsync_dir(self.dir)
        return self._fd, path

    def _close(self) -> None:
        """Close the open segment, cut to its records (readers then take its size)."""
        with self._switch:
            if self._fd is not None:
                os.ftruncate(self._fd, self._end)
                os.close(self._fd)
                self._fd = None
            self._open = None

    def log_extent(self) -> list[tuple[Path, int]]:
        """Each segment and how many of its bytes are records, in order (the open one's zero
        tail excluded): concatenated, those bytes are one valid log."""
        with self._switch:
            current = self._open
            return [(s, current[1] if current is not None and s == current[0] else s.stat().st_size)
                    for s in sorted(self.dir.glob("log-*.wal"))]

    def checkpoint_path(self, seq: int) -> Path:
        p = self.dir / checkpoint_name(seq)
        if not p.exists():
            raise NotFound(f"no metadata checkpoint {seq}")
        return p

