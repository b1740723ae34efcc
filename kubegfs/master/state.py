"""The master's replicated state machine: namespace, chunk table, snapshot catalog.

Every mutation is an *op* (a msgpack-able dict). The server validates a request into an op with a
``prepare_*`` method (which raises a clear error and changes nothing), appends the op to the
operation log, and ``apply`` executes it; replaying the log after the latest checkpoint through
the same ``apply`` rebuilds exactly the same state. ``apply`` never raises for a prepared op.

Snapshot records of format 3 are Merkle roots (merkle.py). ``blocks`` holds every directory
block a committed snapshot reaches, with its reference count (one per snapshot root naming it
and one per block naming it as a child). Invariants: a block with a count holds a count on each
child, so everything a counted block reaches is counted; a block's own files hold one snapshot
reference on each chunk exactly while the block is counted (so ``snap`` costs O(new blocks) per
snapshot, not O(files)); a block whose count drops to zero goes to ``garbage_blocks`` (soft), and
its copies are deleted only through the deletion gate once that op is durable.

Chunk sharing (GFS §3.4) is tracked by reference counts: ``live[h]`` counts references from files
in the live tree, ``snap[h]`` references from committed snapshots. A snapshot's capture is O(1)
(it pins the current immutable root and bumps ``epoch``); until it commits, every chunk born
before its epoch is treated as shared, so the first write to it clones it (C → C′) first.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zstandard

from .. import merkle, paths
from .. import namespace as ns
from ..errors import AlreadyExists, Conflict, CorruptData, InvalidArgument, NotFound
from ..formats import (
    ZSTD_LEVEL,
    no_gc,
    packb,
    unpack_handles,
    unpackb,
)
from . import ops

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_REPLICATION = 3
MAX_REMEMBERED_RESTORES = 10_000


def now_ns() -> int:
    return time.time_ns()


def rfc3339(ts_ns: int) -> str:
    t = time.gmtime(ts_ns // 1_000_000_000)
    ms = (ts_ns // 1_000_000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z"


class BlockCount:
    __slots__ = ("refs", "info")

    def __init__(self, refs: int, info: merkle.BlockInfo) -> None:
        self.refs = refs
        self.info = info


class RefPlan:
    """A commit's counting of its new blocks worked out ahead (see ``MasterState.plan_blocks``):
    the root it counts, the catalog's ``blocks_gen`` it holds for, the new blocks' rows (with their counts) and the
    counted blocks' rows with what each gains."""
    __slots__ = ("root", "gen", "rows", "bumps", "used")

    def __init__(self, root: bytes, gen: int, rows: dict[bytes, BlockCount], bumps: list[tuple[BlockCount, int]]) -> None:
        self.root = root
        self.gen = gen
        self.rows = rows
        self.bumps = bumps
        self.used = False


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
        self.snapshots: dict[str, ops.SnapshotEntry] = {}  # id -> catalog entry
        self.snapshot_names: dict[str, str] = {}  # name -> id
        self.catalog_gen = 0  # moves with every applied snapshot op (see held_by)
        self._held: tuple[int, dict[str, list[ops.SnapshotEntry]]] | None = None
        self.pins: dict[str, Pin] = {}  # pending snapshots' pinned subtrees
        self.protected: set[int] = set()  # unreferenced but maybe in a pending snapshot
        self.garbage: set[int] = set()  # freed handles to delete from chunkservers (soft)
        self.cow_clones = 0
        self.restores: dict[str, dict[str, Any]] = {}  # restore id -> result (idempotency)
        self.blocks: dict[bytes, BlockCount] = {}  # directory blocks committed snapshots reach
        self.blocks_gen = 0  # moves whenever a block is counted for the first time or no longer
        self.garbage_blocks: set[bytes] = set()  # freed blocks to delete from chunkservers (soft)
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

    def snapshot_by_ref(self, ref: str) -> ops.SnapshotEntry:
        sid = self.snapshot_names.get(ref, ref)
        entry = self.snapshots.get(sid)
        if entry is None:
            raise NotFound(f"no such snapshot: {ref}")
        return entry

    def held_by(self, cs_id: str) -> list[ops.SnapshotEntry]:
        """The ready snapshots whose holders name chunkserver ``cs_id``. Every heartbeat asks
        this of its sender, so it is an index, made again on the first question after a
        snapshot op was applied (``catalog_gen``), not a walk of the whole catalog each time."""
        if self._held is None or self._held[0] != self.catalog_gen:
            idx: dict[str, list[ops.SnapshotEntry]] = {}
            for e in self.snapshots.values():
                if e["state"] == "ready":
                    for h in e["holders"]:
                        idx.setdefault(h["id"], []).append(e)
            self._held = (self.catalog_gen, idx)
        return self._held[1].get(cs_id, [])

    # ------------------------------------------------------------------ prepare (validate)

    def prepare_mkdir(self, path: str, parents: bool = False, mode: int = ns.DEFAULT_DIR_MODE) -> ops.Mkdir:
        parts = paths.split(path)
        _check_mode(mode)
        ns.mkdir(self.root, parts, 0, mode, parents)  # raises if invalid
        return ops.Mkdir(op="mkdir", path=paths.join(parts), parents=parents, mode=mode, mtime=now_ns())

    def prepare_rm(self, path: str, recursive: bool = False) -> ops.Rm:
        parts, node = self.lookup(path)
        if not parts:
            raise InvalidArgument("cannot remove the root")
        if isinstance(node, ns.Dir) and len(node.children) and not recursive:
            raise Conflict(f"directory not empty: {paths.join(parts)} (use recursive)")
        return ops.Rm(op="rm", path=paths.join(parts), mtime=now_ns())

    def prepare_mv(self, src: str, dst: str) -> ops.Mv:
        s = paths.split(src)
        d = paths.split(dst)
        ns.check_move(s, d)
        ns.must_get(self.root, s)
        if ns.get(self.root, d) is not None:
            raise AlreadyExists(f"destination exists: {paths.join(d)}")
        ns.must_dir(self.root, d[:-1])
        return ops.Mv(op="mv", src=paths.join(s), dst=paths.join(d), mtime=now_ns())

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
                       opened: ns.File | None, inplace: int | None) -> ops.Commit:
        """The commit op of a validated write, or Conflict if the file changed since it opened (or
        a snapshot now shares the chunk it appended to in place)."""
        parts = paths.split(path)
        if ns.get(self.root, parts) is not opened:
            raise Conflict(f"{path} changed during the write; retry")
        if inplace is not None and self.is_shared(inplace):
            raise Conflict("a snapshot was taken during the append; retry")
        ns.must_dir(self.root, parts[:-1])
        return ops.Commit(op="commit", path=path, size=size, chunks=handles,
                          new=[[h, 1] for h in new], mode=file_mode, mtime=now_ns())

    # ------------------------------------------------------------------ apply

    def apply(self, op: ops.Op) -> Any:
        """Execute ``op`` (its kind picks the method from ``_APPLY``); an op of a kind this
        master does not know is CorruptData and changes nothing."""
        fn = _APPLY.get(op["op"])
        if fn is None:
            raise CorruptData(f"unknown op kind {op['op']!r} (seq {op.get('seq')})")
        result = fn(self, op)
        if "seq" in op:
            self.seq = op["seq"]
        return result

    def _apply_init(self, op: ops.Init) -> None:
        self.chunk_size = op["chunk_size"]
        self.replication = op["replication"]

    def _apply_incarnation(self, op: ops.Incarnation) -> None:
        self.incarnation = op["n"]
        self.next_counter = 0

    def _apply_mkdir(self, op: ops.Mkdir) -> None:
        parts = paths.split(op["path"])
        self.n_dirs += sum(1 for i in range(1, len(parts) + 1) if ns.get(self.root, parts[:i]) is None)
        self.root = ns.mkdir(self.root, parts, op["mtime"], op["mode"], op["parents"])

    def _apply_commit(self, op: ops.Commit) -> None:
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

    def _apply_bump(self, op: ops.Bump) -> None:
        """A chunk's new version. With ``path`` (the file it belongs to), the directories on that
        path become new nodes, so their memoised Merkle digests (which record chunk versions) are
        computed afresh: a bump whose append never commits leaves no stale digest behind, and a
        replay computes the same digests as the original run."""
        self.version[op["h"]] = op["v"]
        if op.get("path"):
            parts = paths.split(op["path"])
            f = ns.get(self.root, parts)
            if isinstance(f, ns.File) and op["h"] in f.chunks:
                self.root = ns.replace(self.root, parts, f, _dir_mtime(self.root, parts))

    def _apply_cow(self, op: ops.Cow) -> None:
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

    def _apply_rm(self, op: ops.Rm) -> None:
        parts = paths.split(op["path"])
        node = ns.must_get(self.root, parts)
        self.root = ns.replace(self.root, parts, None, op["mtime"])
        self._uncount(node)
        self._unref_live(ns.iter_chunks(node))

    def _apply_mv(self, op: ops.Mv) -> None:
        s = paths.split(op["src"])
        d = paths.split(op["dst"])
        node = ns.must_get(self.root, s)
        root = ns.replace(self.root, s, None, op["mtime"])
        self.root = ns.replace(root, d, node, op["mtime"])

    def _apply_snap_capture(self, op: ops.SnapCapture) -> None:
        self.catalog_gen += 1
        parts = paths.split(op["path"])
        node = ns.must_get(self.root, parts)
        self.epoch += 1
        self.pins[op["id"]] = Pin(node, self.epoch)
        entry: ops.SnapshotEntry = {
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

    def _apply_snap_commit(self, op: ops.SnapCommit) -> None:
        """Format 3 (``blocks`` present): count the root and, through it, the blocks the op
        carries (exactly those not counted when it was prepared; their chunk references
        already, if the server ``_precounted`` them: see ``precount_blocks``; as the server
        planned it while the blocks were on their way, ``_plan``, if no block was counted or
        released since: see ``plan_blocks``); format 2: one snapshot reference per chunk in
        ``handles_z``."""
        self.catalog_gen += 1
        entry = self.snapshots[op["id"]]
        if op.get("blocks") is not None:
            root = bytes.fromhex(op["root"])
            infos = op.get("_infos")  # the server's own, as encoded into "blocks" (a replay decodes them)
            plan = op.get("_plan")
            precounted = bool(op.get("_precounted"))
            with no_gc():  # an entry per new block: a full collection would rescan the namespace
                if infos is None:
                    self.ref_blocks(root, decode_block_infos(op["blocks"]))
                elif plan is None or not self.install_plan(root, plan, infos, precounted):
                    self.ref_blocks(root, infos, precounted)
        elif not op.get("_precounted"):
            self.count_snapshot_refs(unpack_handles(op["handles_z"]))
        entry.update({
            "state": "ready", "sha256": op["sha256"], "record_bytes": op["record_bytes"],
            "holders": op["holders"], "files": op["files"], "dirs": op["dirs"], "chunks": op["chunks"],
            "logical_bytes": op["logical_bytes"], "duration_seconds": op["duration_seconds"],
            "handles_z": op.get("handles_z", b""), "location_reason": op.get("location_reason", ""),
            "root": op.get("root", ""), "changes": op.get("changes") or {},
            "format": 3 if op.get("blocks") is not None else 2,
            "shipped_bytes": op.get("shipped_bytes", op["record_bytes"]),
        })
        self.pins.pop(op["id"], None)
        self._recheck_protected()

    def _apply_snap_fail(self, op: ops.SnapFail) -> None:
        self.catalog_gen += 1
        entry = self.snapshots[op["id"]]
        entry.update({"state": "failed", "error": op["error"]})
        self.pins.pop(op["id"], None)
        self._recheck_protected()

    def _apply_snap_adopt(self, op: ops.SnapAdopt) -> None:
        """A snapshot record found on the chunkservers is a catalog entry again (``master
        recover`` without metadata): its chunks, at the record's versions, count as referenced."""
        self.catalog_gen += 1
        handles = unpack_handles(op["handles_z"])
        versions = array("q")
        versions.frombytes(op["versions"])
        for h, v in zip(handles, versions, strict=True):
            if v > self.version.get(h, 0):
                self.version[h] = v
            self.born.setdefault(h, 0)
        if op.get("blocks") is not None:  # format 3: its blocks are counted (and so its chunks)
            self.ref_blocks(bytes.fromhex(op["root"]), decode_block_infos(op["blocks"]))
        else:
            self.count_snapshot_refs(handles)
        entry: ops.SnapshotEntry = {
            "id": op["id"], "name": op["name"], "path": op["path"], "created": rfc3339(op["created"]),
            "created_ns": op["created"], "epoch": op.get("epoch", 0), "state": "ready",
            "copies": len(op["holders"]), "targets": [], "near": {}, "labels": {"kubegfs.io/adopted": "true"},
            "files": op["files"], "dirs": op["dirs"], "chunks": len(handles), "logical_bytes": op["logical_bytes"],
            "record_bytes": op["record_bytes"], "sha256": op["sha256"], "holders": op["holders"], "error": "",
            "duration_seconds": 0.0, "handles_z": op["handles_z"], "location_reason": "adopted",
            "format": 3 if op.get("blocks") is not None else 2, "root": op.get("root", ""), "changes": {},
        }
        self.snapshots[op["id"]] = entry
        self.snapshot_names[op["name"]] = op["id"]

    def _apply_snap_holders(self, op: ops.SnapHolders) -> None:
        self.catalog_gen += 1
        self.snapshots[op["id"]]["holders"] = op["holders"]

    def _apply_snap_delete(self, op: ops.SnapDelete) -> None:
        self.catalog_gen += 1
        entry = self.snapshots.pop(op["id"])
        if self.snapshot_names.get(entry["name"]) == op["id"]:
            del self.snapshot_names[entry["name"]]
        self.pins.pop(op["id"], None)
        if entry.get("state") == "ready":
            if entry.get("format") == 3:
                self.unref_block(bytes.fromhex(entry["root"]))
            else:
                self._release(self.snap, unpack_handles(entry["handles_z"]))
        self._recheck_protected()

    def _apply_restore(self, op: ops.Restore) -> dict[str, Any]:
        if op.get("format") in (3, 4):
            return self._apply_restore_blocks(op)
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
        self._remember_restore(op, result)
        return result

    def _remember_restore(self, op: ops.Restore, result: dict[str, Any]) -> None:
        rid = op.get("rid")
        if rid:
            self.restores[rid] = {**(op.get("summary") or {}), **result}
            while len(self.restores) > MAX_REMEMBERED_RESTORES:
                del self.restores[next(iter(self.restores))]

    def restore_candidates(self, parts: tuple[str, ...], mode: str, source: str) -> list[ns.Node | None]:
        """Live directories a format-3 restore may reuse where their digests match the
        snapshot's: the target itself (in place) and the snapshot's original path."""
        cands = [ns.get(self.root, parts)] if mode == "inplace" else []
        src = paths.split(source)
        if src != parts:
            cands.append(ns.get(self.root, src))
        return cands

    def version_or_zero(self, h: int) -> int:
        return self.version.get(h, 0)

    def _apply_restore_blocks(self, op: ops.Restore) -> dict[str, Any]:
        """Swap in the tree named by ``root``: live directories whose digests match are reused
        as they are, the rest is built from the blocks the op carries (the server checked that
        they suffice against this very state); format 4, in place: the live tree with the op's
        edits made (see namespace.edits_to; the server swaps in the snapshot's tree in memory,
        which has the same content). Reference counts change only where the new tree
        differs from the old one (identical nodes are skipped), so an in-place restore costs
        what changed."""
        parts = paths.split(op["path"])
        old = ns.get(self.root, parts) if op["mode"] == "inplace" else None
        tree = op.get("_tree")  # assembled by the server against this very state
        if tree is None and op.get("format") == 4:  # an in-place restore as edits of the live tree
            if not isinstance(old, ns.Dir):
                raise InvalidArgument(f"restore edits need a directory at {op['path']}")
            tree = ns.apply_edits(old, op["edits"])
        if tree is None:
            have = dict(merkle.unpack_frames(op["blocks"], verify=False))
            tree, _used = merkle.assemble(bytes.fromhex(op["root"]), have,
                                          self.restore_candidates(parts, op["mode"], op["source_path"]),
                                          self.version_or_zero)
        added, removed = ns.changed_subtrees(old, tree)
        for node in added:
            for h in ns.iter_chunks(node):
                self.live[h] = self.live.get(h, 0) + 1
            files, dirs, _refs, size = ns.count(node)
            self.n_files += files
            self.n_dirs += dirs
            self.n_bytes += size
        self.root = ns.replace(self.root, parts, tree, op["mtime"])
        for node in removed:
            self._uncount(node)
            self._unref_live(ns.iter_chunks(node))
        result: dict[str, Any] = dict(op["counts"])
        self._remember_restore(op, result)
        return result

    # ------------------------------------------------------------------ directory blocks

    def ref_blocks(self, root: bytes, new: dict[bytes, merkle.BlockInfo], precounted: bool = False) -> None:
        """Count one more reference to ``root``; a block counted for the first time counts its
        children and its files' chunks (its info comes from ``new``), the chunks only if not
        ``precounted`` (``new`` is then exactly the blocks not counted, and
        ``precount_blocks`` counted the chunks of every one of them)."""
        stack = [root]
        blocks = self.blocks
        while stack:
            d = stack.pop()
            b = blocks.get(d)
            if b is not None:
                b.refs += 1
                continue
            info = new[d]
            blocks[d] = BlockCount(1, info)
            self.blocks_gen += 1
            self.garbage_blocks.discard(d)
            if not precounted:
                self.count_snapshot_refs(_handles(info.handles))
            stack.extend(info.children)

    def plan_blocks(self, root: bytes, new: dict[bytes, merkle.BlockInfo], gen: int) -> RefPlan | None:
        """What :meth:`ref_blocks` of ``root`` would do with ``new`` (the blocks not counted at
        ``blocks_gen`` ``gen``), worked out without changing anything (a worker may run it while
        the blocks are on their way): a row for each new block with its count (the new blocks
        and the root naming it), and what each counted block named by a new block (or the root,
        if counted) gains. None if ``new`` is not exactly that here: a child neither new nor
        counted, a new block counted already or reached by nothing new, or ``blocks_gen`` not
        ``gen`` before or after (a block was counted or released: counted blocks' rows are
        never removed or made anew without it moving)."""
        if self.blocks_gen != gen:
            return None
        blocks = self.blocks
        rows = {d: BlockCount(0, info) for d, info in new.items()}
        more: dict[bytes, int] = {}
        with no_gc():
            for info in new.values():
                for c in info.children:
                    r = rows.get(c)
                    if r is not None:
                        r.refs += 1
                    else:
                        more[c] = more.get(c, 0) + 1
            r = rows.get(root)
            if r is not None:
                r.refs += 1
            else:
                more[root] = more.get(root, 0) + 1
            bumps = []
            for c, n in more.items():
                b = blocks.get(c)
                if b is None:
                    return None
                bumps.append((b, n))
        if any(r.refs == 0 for r in rows.values()) or not blocks.keys().isdisjoint(rows):
            return None
        return RefPlan(root, gen, rows, bumps) if self.blocks_gen == gen else None

    def install_plan(self, root: bytes, plan: RefPlan, new: dict[bytes, merkle.BlockInfo],
                     precounted: bool = False) -> bool:
        """Count ``plan`` (from :meth:`plan_blocks` of ``root`` and ``new``) as :meth:`ref_blocks`
        would count it, if ``blocks_gen`` has not moved since it was made (then the counted
        blocks are the same rows, and the counts it adds to are relative); False (nothing
        changed) if it has: the caller counts with ``ref_blocks``. Each plan is installed at
        most once."""
        if plan.gen != self.blocks_gen or plan.used or plan.root != root:
            return False
        plan.used = True
        self.blocks.update(plan.rows)
        for b, n in plan.bumps:
            b.refs += n
        self.blocks_gen += len(plan.rows)
        if self.garbage_blocks:
            self.garbage_blocks.difference_update(plan.rows)
        if not precounted:
            self.precount_blocks(new.values())
        return True

    def unref_block(self, root: bytes) -> None:
        stack = [root]
        blocks = self.blocks
        while stack:
            d = stack.pop()
            b = blocks[d]
            b.refs -= 1
            if b.refs:
                continue
            del blocks[d]
            self.blocks_gen += 1
            self.garbage_blocks.add(d)
            self._release(self.snap, _handles(b.info.handles))
            stack.extend(b.info.children)

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
        hs = handles if isinstance(handles, list) else list(handles)
        if snap.keys().isdisjoint(hs) and len(set(hs)) == len(hs):
            snap.update(dict.fromkeys(hs, 1))  # none counted yet, each once (a first snapshot's): no Python per handle
            return
        get = snap.get
        for h in hs:
            snap[h] = get(h, 0) + 1

    def precount_blocks(self, infos: Iterable[merkle.BlockInfo]) -> None:
        """The snapshot references of the chunks of ``infos``, blocks a pending snapshot's
        commit is to count, counted before that commit is logged (a big first snapshot's ~1M
        references, in slices between other requests instead of in one apply). Meanwhile they
        only keep chunks that the pin protects anyway from being freed. The commit's apply
        takes them as its own (``_precounted``) only if no block was counted or released since
        they were worked out (``blocks_gen``: then they are still exactly the blocks it counts);
        else ``unprecount_blocks`` takes them back first. Replay counts inside the commit."""
        self.count_snapshot_refs(_handles(b"".join([info.handles for info in infos])))

    def unprecount_blocks(self, infos: Iterable[merkle.BlockInfo]) -> None:
        """Take back ``precount_blocks``: a chunk whose last reference that was is freed, as
        if it had never been counted."""
        for info in infos:
            self._release(self.snap, _handles(info.handles))

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
            "blocks": encode_block_infos({d: b.info for d, b in self.blocks.items()}),
            "block_refs": [self.blocks[d].refs for d in sorted(self.blocks)],
        }


# op kind -> its apply method, built once (replay dispatches every record through it)
_APPLY: dict[str, Callable[[MasterState, Any], Any]] = {
    "init": MasterState._apply_init,
    "incarnation": MasterState._apply_incarnation,
    "mkdir": MasterState._apply_mkdir,
    "commit": MasterState._apply_commit,
    "bump": MasterState._apply_bump,
    "cow": MasterState._apply_cow,
    "rm": MasterState._apply_rm,
    "mv": MasterState._apply_mv,
    "snap_capture": MasterState._apply_snap_capture,
    "snap_commit": MasterState._apply_snap_commit,
    "snap_fail": MasterState._apply_snap_fail,
    "snap_adopt": MasterState._apply_snap_adopt,
    "snap_holders": MasterState._apply_snap_holders,
    "snap_delete": MasterState._apply_snap_delete,
    "restore": MasterState._apply_restore,
}


def _handles(packed: bytes) -> list[int]:
    a = array("q")
    a.frombytes(packed)
    return a.tolist()


def encode_block_infos(infos: dict[bytes, merkle.BlockInfo]) -> list[list[bytes]]:
    """Block infos for an op record: ``[digest, children digests joined, packed handles]``."""
    return [[dg, b"".join(i.children), i.handles] for dg, i in sorted(infos.items())]


def encode_block_infos_z(infos: dict[bytes, merkle.BlockInfo]) -> bytes:
    """:func:`encode_block_infos` packed and compressed, as a commit op carries them: the rows
    are mostly digests and handles, and a first snapshot's are big (~86k rows, 14 MB at 1M
    files: 8 MB compressed, that much less to log, fsync and send to the metadata copies, and
    one bytes object to pack on the event loop instead of a list per row)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(packb(encode_block_infos(infos)))


def decode_block_infos(rows: list[list[bytes]] | bytes) -> dict[bytes, merkle.BlockInfo]:
    """Block infos from :func:`encode_block_infos` rows or :func:`encode_block_infos_z` bytes."""
    if isinstance(rows, bytes):
        try:
            rows = unpackb(zstandard.ZstdDecompressor().decompress(rows))
        except zstandard.ZstdError as exc:
            raise CorruptData(f"bad compressed block infos: {exc}") from exc
        if not isinstance(rows, list):
            raise CorruptData("block infos are not a list of rows")
    out = {}
    for dg, kids, handles in rows:
        out[dg] = merkle.BlockInfo(tuple(kids[i:i + 32] for i in range(0, len(kids), 32)), handles)
    return out


def _dir_mtime(root: ns.Dir, parts: tuple[str, ...]) -> int:
    parent = ns.get(root, parts[:-1])
    return parent.mtime if isinstance(parent, ns.Dir) else 0


def _check_mode(mode: int) -> None:
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise InvalidArgument("mode must be an integer between 0 and 0o7777")
