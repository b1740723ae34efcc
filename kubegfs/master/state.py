"""The master's replicated state machine: namespace, chunk table, snapshot catalog.

Every mutation is an *op* (a msgpack-able dict). The server validates a request into an op with a
``prepare_*`` method (which raises a clear error and changes nothing), appends the op to the
operation log, and ``apply`` executes it; replaying the log after the latest checkpoint through
the same ``apply`` rebuilds exactly the same state. ``apply`` never raises for a prepared op.

Chunk sharing (GFS §3.4) is tracked by reference counts: ``live[h]`` counts references from files
in the live tree, ``snap[h]`` references from committed snapshots. A snapshot's capture is O(1)
(it pins the current immutable root and bumps ``epoch``); until it commits, every chunk born
before its epoch is treated as shared, so the first write to it clones it (C → C′) first.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import namespace as ns
from .. import paths
from ..errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from ..formats import (
    unpack_handles,
)

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_REPLICATION = 3
MAX_REMEMBERED_RESTORES = 10_000


def now_ns() -> int:
    return time.time_ns()


def rfc3339(ts_ns: int) -> str:
    t = time.gmtime(ts_ns // 1_000_000_000)
    ms = (ts_ns // 1_000_000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z"


@dataclass
class Pin:
    node: ns.Node
    epoch: int


class MasterState:
    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, replication: int = DEFAULT_REPLICATION) -> None:
        self.chunk_size = chunk_size
        self.replication = replication
        self.root: ns.Dir = ns.empty_root()
        self.version: dict[int, int] = {}
        self.born: dict[int, int] = {}
        self.live: dict[int, int] = {}
        self.snap: dict[int, int] = {}
        self.epoch = 1
        self.seq = 0
        self.incarnation = 0
        self.next_counter = 0
        self.snapshots: dict[str, dict[str, Any]] = {}  # id -> catalog entry
        self.snapshot_names: dict[str, str] = {}  # name -> id
        self.pins: dict[str, Pin] = {}  # pending snapshots' pinned subtrees
        self.protected: set[int] = set()  # unreferenced but maybe in a pending snapshot
        self.garbage: set[int] = set()  # freed handles to delete from chunkservers (soft)
        self.cow_clones = 0
        self.restores: dict[str, dict[str, Any]] = {}  # restore id -> result (idempotency)
        self.n_files = 0  # kept up to date by apply: status and metrics never walk the tree
        self.n_dirs = 1
        self.n_bytes = 0

    # ------------------------------------------------------------------ queries

    def lookup(self, path: str) -> tuple[tuple[str, ...], ns.Node]:
        parts = paths.split(path)
        return parts, ns.must_get(self.root, parts)

    def max_pending_epoch(self) -> int:
        return max((p.epoch for p in self.pins.values()), default=0)

    def is_shared(self, h: int) -> bool:
        return (
            self.live.get(h, 0) + self.snap.get(h, 0) > 1
            or self.born.get(h, 0) < self.max_pending_epoch()
        )

    def new_handle(self) -> int:
        """Handles are unique across restarts: (incarnation << 32) | counter."""
        self.next_counter += 1
        return (self.incarnation << 32) | self.next_counter

    def snapshot_by_ref(self, ref: str) -> dict[str, Any]:
        sid = self.snapshot_names.get(ref, ref)
        entry = self.snapshots.get(sid)
        if entry is None:
            raise NotFound(f"no such snapshot: {ref}")
        return entry

    # ------------------------------------------------------------------ prepare (validate)

    def prepare_mkdir(self, path: str, parents: bool = False, mode: int = ns.DEFAULT_DIR_MODE) -> dict[str, Any]:
        parts = paths.split(path)
        _check_mode(mode)
        ns.mkdir(self.root, parts, 0, mode, parents)  # raises if invalid
        return {"op": "mkdir", "path": paths.join(parts), "parents": parents, "mode": mode, "mtime": now_ns()}

    def prepare_rm(self, path: str, recursive: bool = False) -> dict[str, Any]:
        parts, node = self.lookup(path)
        if not parts:
            raise InvalidArgument("cannot remove the root")
        if isinstance(node, ns.Dir) and len(node.children) and not recursive:
            raise Conflict(f"directory not empty: {paths.join(parts)} (use recursive)")
        return {"op": "rm", "path": paths.join(parts), "mtime": now_ns()}

    def prepare_mv(self, src: str, dst: str) -> dict[str, Any]:
        s = paths.split(src)
        d = paths.split(dst)
        ns.check_move(s, d)
        ns.must_get(self.root, s)
        if ns.get(self.root, d) is not None:
            raise AlreadyExists(f"destination exists: {paths.join(d)}")
        ns.must_dir(self.root, d[:-1])
        return {"op": "mv", "src": paths.join(s), "dst": paths.join(d), "mtime": now_ns()}

    def prepare_open(self, path: str, mode: str, file_mode: int) -> tuple[str, tuple[str, ...], ns.File | None]:
        """Check a write may start: (normalized path, its parts, the file as it is now or None)."""
        parts = paths.split(path)
        if mode not in ("create", "overwrite", "append"):
            raise InvalidArgument("mode must be create, overwrite or append")
        _check_mode(file_mode)
        if not parts:
            raise InvalidArgument("cannot write to /")
        norm = paths.join(parts)
        ns.must_dir(self.root, parts[:-1])
        node = ns.get(self.root, parts)
        if isinstance(node, ns.Dir):
            raise InvalidArgument(f"{norm} is a directory")
        if mode == "create" and node is not None:
            raise AlreadyExists(f"{norm} already exists")
        if mode == "append" and node is None:
            raise NotFound(f"no such file: {norm}")
        return norm, parts, node

    def validate_commit(self, size: int, handles: list[int], acked: dict[int, list[str]],
                        base: tuple[int, ...], allocated: Iterable[int], opened: ns.File | None,
                        append: bool) -> list[int]:
        """Check a commit's chunk list against its write: returns the chunks it adds."""
        cs = self.chunk_size
        if not ((size == 0 and not handles) or (len(handles) - 1) * cs < size <= len(handles) * cs):
            raise InvalidArgument(f"size {size} does not fit {len(handles)} chunks of {cs} bytes")
        if tuple(handles[: len(base)]) != base:
            raise InvalidArgument("the chunk list must start with the file's existing chunks")
        new = handles[len(base):]
        placed = set(allocated)
        if len(set(new)) != len(new) or any(h not in placed for h in new):
            raise InvalidArgument("chunk list names chunks not allocated for this write")
        for h in new:
            if not acked.get(h):
                raise InvalidArgument(f"chunk {h:016x} has no replica that acknowledged it")
        if append and size < (opened.size if opened else 0):
            raise InvalidArgument("an append cannot shrink the file")
        return new

    def prepare_commit(self, path: str, size: int, handles: list[int], new: list[int], file_mode: int,
                       opened: ns.File | None, inplace: int | None) -> dict[str, Any]:
        """The commit op of a validated write, or Conflict if the file changed since it opened (or
        a snapshot now shares the chunk it appended to in place)."""
        parts = paths.split(path)
        if ns.get(self.root, parts) is not opened:
            raise Conflict(f"{path} changed during the write; retry")
        if inplace is not None and self.is_shared(inplace):
            raise Conflict("a snapshot was taken during the append; retry")
        ns.must_dir(self.root, parts[:-1])
        return {"op": "commit", "path": path, "size": size, "chunks": handles,
                "new": [[h, 1] for h in new], "mode": file_mode, "mtime": now_ns()}

    # ------------------------------------------------------------------ apply

    def apply(self, op: dict[str, Any]) -> Any:
        fn = getattr(self, "_apply_" + op["op"])
        result = fn(op)
        if "seq" in op:
            self.seq = op["seq"]
        return result

    def _apply_init(self, op: dict[str, Any]) -> None:
        self.chunk_size = op["chunk_size"]
        self.replication = op["replication"]

    def _apply_incarnation(self, op: dict[str, Any]) -> None:
        self.incarnation = op["n"]
        self.next_counter = 0

    def _apply_mkdir(self, op: dict[str, Any]) -> None:
        parts = paths.split(op["path"])
        self.n_dirs += sum(1 for i in range(1, len(parts) + 1) if ns.get(self.root, parts[:i]) is None)
        self.root = ns.mkdir(self.root, parts, op["mtime"], op["mode"], op["parents"])

    def _apply_commit(self, op: dict[str, Any]) -> None:
        parts = paths.split(op["path"])
        old = ns.get(self.root, parts)
        for h, v in op.get("new", ()):
            self.version[h] = v
            self.born[h] = self.epoch
            self.protected.discard(h)
        chunks = tuple(op["chunks"])
        for h in chunks:
            self.live[h] = self.live.get(h, 0) + 1
        if isinstance(old, ns.File):
            self._unref_live(old.chunks)
            self.n_bytes -= old.size
        else:
            self.n_files += 1
        self.n_bytes += op["size"]
        f = ns.File(op["size"], op["mtime"], op["mode"], chunks)
        self.root = ns.replace(self.root, parts, f, op["mtime"])

    def _apply_bump(self, op: dict[str, Any]) -> None:
        self.version[op["h"]] = op["v"]

    def _apply_cow(self, op: dict[str, Any]) -> None:
        parts = paths.split(op["path"])
        f = ns.get(self.root, parts)
        assert isinstance(f, ns.File)
        old, new, idx = op["old"], op["new"], op["index"]
        chunks = list(f.chunks)
        chunks[idx] = new
        self.version[new] = self.version[old]
        self.born[new] = self.epoch
        self.live[new] = 1
        self.cow_clones += 1
        nf = ns.File(f.size, f.mtime, f.mode, tuple(chunks))
        self.root = ns.replace(self.root, parts, nf, _dir_mtime(self.root, parts))
        self._unref_live((old,))

    def _apply_rm(self, op: dict[str, Any]) -> None:
        parts = paths.split(op["path"])
        node = ns.must_get(self.root, parts)
        self.root = ns.replace(self.root, parts, None, op["mtime"])
        self._uncount(node)
        self._unref_live(ns.iter_chunks(node))

    def _apply_mv(self, op: dict[str, Any]) -> None:
        s = paths.split(op["src"])
        d = paths.split(op["dst"])
        node = ns.must_get(self.root, s)
        root = ns.replace(self.root, s, None, op["mtime"])
        self.root = ns.replace(root, d, node, op["mtime"])

    def _apply_snap_capture(self, op: dict[str, Any]) -> None:
        parts = paths.split(op["path"])
        node = ns.must_get(self.root, parts)
        self.epoch += 1
        self.pins[op["id"]] = Pin(node, self.epoch)
        entry = {
            "id": op["id"],
            "name": op["name"],
            "path": op["path"],
            "created": rfc3339(op["created"]),
            "created_ns": op["created"],
            "epoch": self.epoch,
            "state": "pending",
            "copies": op["copies"],
            "targets": op.get("targets") or [],
            "near": op.get("near") or {},
            "labels": op.get("labels") or {},
            "files": 0, "dirs": 0, "chunks": 0, "logical_bytes": 0,
            "record_bytes": 0, "sha256": "", "holders": [], "error": "",
            "duration_seconds": 0.0,
        }
        self.snapshots[op["id"]] = entry
        self.snapshot_names[op["name"]] = op["id"]

    def _apply_snap_commit(self, op: dict[str, Any]) -> None:
        entry = self.snapshots[op["id"]]
        if not op.get("_precounted"):
            self.count_snapshot_refs(unpack_handles(op["handles_z"]))
        entry.update(
            state="ready", sha256=op["sha256"], record_bytes=op["record_bytes"],
            holders=op["holders"], files=op["files"], dirs=op["dirs"], chunks=op["chunks"],
            logical_bytes=op["logical_bytes"], duration_seconds=op["duration_seconds"],
            handles_z=op["handles_z"], location_reason=op.get("location_reason", ""),
            root=op.get("root", ""), changes=op.get("changes") or {},
        )
        self.pins.pop(op["id"], None)
        self._recheck_protected()

    def _apply_snap_fail(self, op: dict[str, Any]) -> None:
        entry = self.snapshots[op["id"]]
        entry.update(state="failed", error=op["error"])
        self.pins.pop(op["id"], None)
        self._recheck_protected()

    def _apply_snap_adopt(self, op: dict[str, Any]) -> None:
        """A snapshot record found on the chunkservers is a catalog entry again (``master
        recover`` without metadata): its chunks, at the record's versions, count as referenced."""
        handles = unpack_handles(op["handles_z"])
        versions = array("q")
        versions.frombytes(op["versions"])
        for h, v in zip(handles, versions, strict=True):
            if v > self.version.get(h, 0):
                self.version[h] = v
            self.born.setdefault(h, 0)
        self.count_snapshot_refs(handles)
        entry = {
            "id": op["id"], "name": op["name"], "path": op["path"], "created": rfc3339(op["created"]),
            "created_ns": op["created"], "epoch": op.get("epoch", 0), "state": "ready",
            "copies": len(op["holders"]), "targets": [], "near": {}, "labels": {"kubegfs.io/adopted": "true"},
            "files": op["files"], "dirs": op["dirs"], "chunks": len(handles), "logical_bytes": op["logical_bytes"],
            "record_bytes": op["record_bytes"], "sha256": op["sha256"], "holders": op["holders"], "error": "",
            "duration_seconds": 0.0, "handles_z": op["handles_z"], "location_reason": "adopted",
        }
        self.snapshots[op["id"]] = entry
        self.snapshot_names[op["name"]] = op["id"]

    def _apply_snap_holders(self, op: dict[str, Any]) -> None:
        self.snapshots[op["id"]]["holders"] = op["holders"]

    def _apply_snap_delete(self, op: dict[str, Any]) -> None:
        entry = self.snapshots.pop(op["id"])
        if self.snapshot_names.get(entry["name"]) == op["id"]:
            del self.snapshot_names[entry["name"]]
        self.pins.pop(op["id"], None)
        if entry.get("state") == "ready":
            self._release(self.snap, unpack_handles(entry["handles_z"]))
        self._recheck_protected()

    def _apply_restore(self, op: dict[str, Any]) -> dict[str, Any]:
        from ..snapobj import parse_record

        parsed = op.get("_parsed") or parse_record(op["blob"])
        parts = paths.split(op["path"])
        tree = parsed.root
        if op["mode"] == "inplace":
            old = ns.get(self.root, parts)
        else:
            old = None
        for h, _v in parsed.chunks:
            self.live[h] = self.live.get(h, 0) + 1
        self.root = ns.replace(self.root, parts, tree, op["mtime"])
        self.n_files += parsed.files
        self.n_dirs += parsed.dirs
        self.n_bytes += int(parsed.header.get("bytes", 0)) if "bytes" in parsed.header else ns.count(tree)[3]
        if old is not None:
            self._uncount(old)
            self._unref_live(ns.iter_chunks(old))
        result = {"files": parsed.files, "dirs": parsed.dirs, "chunks": len(parsed.chunks)}
        if op.get("rid"):
            self.restores[op["rid"]] = {**(op.get("summary") or {}), **result}
            while len(self.restores) > MAX_REMEMBERED_RESTORES:
                del self.restores[next(iter(self.restores))]
        return result

    def _uncount(self, node: ns.Node) -> None:
        files, dirs, _refs, size = ns.count(node)
        self.n_files -= files
        self.n_dirs -= dirs
        self.n_bytes -= size

    def recount(self) -> None:
        self.n_files, self.n_dirs, _refs, self.n_bytes = ns.count(self.root)

    # ------------------------------------------------------------------ refcounts

    def count_snapshot_refs(self, handles: Iterable[int]) -> None:
        """Add one snapshot reference per handle. The server may do this in slices before it
        logs the commit (the snapshot is still pending, so sharing is already assumed); replay
        does it inside the commit."""
        snap = self.snap
        get = snap.get
        for h in handles:
            snap[h] = get(h, 0) + 1

    def _unref_live(self, handles: Iterable[int]) -> None:
        self._release(self.live, handles)

    def _release(self, counts: dict[int, int], handles: Iterable[int]) -> None:
        """Drop one reference per handle from ``counts`` (live or snapshot references); a chunk
        whose last reference went may be freed."""
        freed = []
        for h in handles:
            c = counts.get(h, 0) - 1
            if c > 0:
                counts[h] = c
            else:
                counts.pop(h, None)
                freed.append(h)
        for h in freed:
            self._maybe_free(h)

    def _maybe_free(self, h: int) -> None:
        if self.live.get(h, 0) or self.snap.get(h, 0):
            return
        if self.born.get(h, 0) < self.max_pending_epoch():
            self.protected.add(h)
            return
        self.version.pop(h, None)
        self.born.pop(h, None)
        self.protected.discard(h)
        self.garbage.add(h)

    def _recheck_protected(self) -> None:
        for h in list(self.protected):
            self.protected.discard(h)
            self._maybe_free(h)

    # ------------------------------------------------------------------ checkpoint

    def checkpoint_view(self) -> dict[str, Any]:
        """An O(copy of flat dicts) consistent view that can be encoded off the event loop."""
        if self.pins:
            raise Conflict("a snapshot is being built; checkpoint deferred")
        return {
            "seq": self.seq,
            "root": self.root,
            "version": self.version.copy(),
            "born": self.born.copy(),
            "snap": self.snap.copy(),
            "epoch": self.epoch,
            "incarnation": self.incarnation,
            "next_counter": self.next_counter,
            "chunk_size": self.chunk_size,
            "replication": self.replication,
            "snapshots": [dict(e) for e in self.snapshots.values()],
            "cow_clones": self.cow_clones,
            "restores": dict(self.restores),
        }


def _dir_mtime(root: ns.Dir, parts: tuple[str, ...]) -> int:
    parent = ns.get(root, parts[:-1])
    return parent.mtime if isinstance(parent, ns.Dir) else 0


def _check_mode(mode: int) -> None:
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise InvalidArgument("mode must be an integer between 0 and 0o7777")
