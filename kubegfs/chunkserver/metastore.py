"""A chunkserver's copy of the master's metadata: checkpoints and op-log records it was sent.

Layout under ``<data>/meta/`` is the master's own (``metalayout``), plus ``meta.json``:
``history`` (which log lineage this copy follows: a master rebuilt from records starts a new one)
and ``base`` (the seq the copy starts after: its first checkpoint's, or 0).

Invariants: the copy is always *complete*: a checkpoint (or base 0) and then every record up to
``last_seq`` without a gap, each batch verified (sha256 of the body, CRC and seq of every
record) and fdatasynced before it is acknowledged. Anything else is refused with 409 and the
copy's position, and the master re-sends or starts the copy over (``reset``).
All methods are blocking; the server calls them from worker threads.
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
from ..metalayout import checkpoint_name, prune_superseded, segment_name, seq_of


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

    def _scan_last(self) -> int:
        """The last good record's seq; a torn tail (a crash mid-append) is cut off."""
        last = max([self.base] + [seq_of(c) for c in self.dir.glob("checkpoint-*.ckpt")])
        for seg in sorted(self.dir.glob("log-*.wal")):
            data = seg.read_bytes()
            scan = scan_log(data)
            for rec in scan.records:
                if isinstance(rec, dict) and isinstance(rec.get("seq"), int) and rec["seq"] > last:
                    last = rec["seq"]
                    self.last_digest = record_digest(rec)
            if scan.problem:
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
        segs = [{"first": seq_of(s), "bytes": s.stat().st_size} for s in sorted(self.dir.glob("log-*.wal"))]
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
            fd = self._segment(self.last_seq + 1)
            view = memoryview(b"".join(out))
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
            self.last_seq, self.last_digest = last_seq, digest
            return last_seq

    def _segment(self, first: int) -> int:
        """The open segment to append to; a new one (named after ``first``, its first record)
        after a checkpoint or a reset."""
        if self._fd is not None and not self._new_segment:
            return self._fd
        self._close()
        segs = sorted(self.dir.glob("log-*.wal"))
        path = segs[-1] if segs and not self._new_segment else self.dir / segment_name(first)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._new_segment = False
        if path not in segs:
            fsync_dir(self.dir)
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def checkpoint_path(self, seq: int) -> Path:
        p = self.dir / checkpoint_name(seq)
        if not p.exists():
            raise NotFound(f"no metadata checkpoint {seq}")
        return p

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("log-*.wal"))
