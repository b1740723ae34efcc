"""Snapshots (HDFS's SnapshotManager): capture, build and ship the SnapObj record, delete,
restore, and keeping each record's copies whole.

Capture is one logged op that pins the current immutable root (O(1)); the record (format 3: the
root digest of Merkle directory blocks, see merkle.py) is built from that pinned view in a worker
thread, each holder (nearest by the topology) is given only the blocks it lacks, then the
snapshot is committed to the catalog. A restore reads the nearest good
copy and applies it as one op. Every copy is checked against the catalog (size, sha256, presence)
at each heartbeat and on every read; a bad one is dropped from the catalog, deleted through the
deletion gate and re-made from a good one by ``repair_records``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from .. import blockdelta, merkle, paths, snapdiff, wire
from .. import metrics as M
from .. import namespace as ns
from ..errors import (
    AlreadyExists,
    Conflict,
    CorruptData,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_json,
)
from ..formats import no_gc
from ..snapobj import (
    MANIFEST_VERSION,
    Manifest,
    ParsedRecord,
    build_manifest,
    build_record,
    parse_manifest,
    parse_record,
    record_format,
)
from ..topology import Location, diversify, find_nearest
from ..web import PEER_ERRORS
from . import ops, precount
from .chunkmap import ChunkserverInfo
from .state import RefPlan, encode_block_infos_z, now_ns

if TYPE_CHECKING:
    from .server import Master

log = logging.getLogger("kubegfs.master")


def diff_nodes(a: merkle.DirRef, va: merkle.VersionOf, b: merkle.DirRef, vb: merkle.VersionOf
               ) -> list[snapdiff.Change]:
    """Diff two trees held in memory (every reference carries its node)."""
    def load(refs: list[tuple[int, merkle.DirRef]]) -> list[merkle.Block]:
        out = []
        for side, r in refs:
            assert r.node is not None
            out.append(merkle.block_of(r.node, vb if side else va))
        return out

    return snapdiff.run(snapdiff.diff_steps(a, b), load)


def _assemble_job(root: bytes, have: dict[bytes, bytes], cands: list[ns.Node | None], version_of: merkle.VersionOf,
                  reused: list[tuple[tuple[str, ...], ns.Dir]], memo: merkle.Decoded,
                  local: merkle.TreeBlocks | None = None) -> tuple[ns.Dir, list[bytes], list[int]]:
    """A restore's tree, the blocks it decoded and the chunk handles their files reference.
    Blocks a snapshot tree in memory (``local``) gives are taken round after round here, in
    one worker job with the collector paused throughout; :class:`merkle.NeedBlocks` names only
    those it cannot give (fetch them and run again)."""
    with no_gc():
        while True:
            try:
                tree, used = merkle.assemble(root, have, cands, version_of, reused, memo)
                break
            except merkle.NeedBlocks as need:
                got = local.take(need.digests) if local is not None else {}
                rest = [d for d in need.digests if d not in got]
                have.update(got)
                if rest:
                    raise merkle.NeedBlocks(rest) from None
        return tree, used, [h for dg in used for h in merkle.block_chunks(have[dg])]


def warm_job(nodes: list[ns.Dir], version_of: merkle.VersionOf) -> int:
    """Digest ``nodes`` (live trees of snapshotted paths) ahead of their next snapshot; how many
    were digested. A chunk freed meanwhile (its file removed since the pass began) ends that
    tree's pass: its directory is no longer live, and what was digested below it stays valid."""
    n = 0
    for node in nodes:
        try:
            merkle.digest(node, version_of)
            n += 1
        except KeyError:
            continue
    return n


Blocks = dict[bytes, blockdelta.Outgoing]
Ahead = tuple[Blocks, dict[bytes, bytes]]  # blocks prepared ahead by digest, and each one's bytes
Prepared = tuple[str, str, bytes, Ahead | None]  # path, snapshot id, live digest, blocks


def ahead_job(pairs: list[tuple[str, str, ns.Dir, ns.Dir, Ahead]],
              version_of: merkle.VersionOf, held: Callable[[bytes], bool], old_version: merkle.VersionOf,
              stop: threading.Event | None = None) -> list[Prepared]:
    """For each (path, snapshot id, live tree, that snapshot's tree, blocks prepared before): the
    live tree's blocks prepared against the snapshot's (see :func:`prepare`); a tree with a chunk
    freed meanwhile is left for the next pass, and every tree once ``stop`` is set."""
    out: list[Prepared] = []
    for p, sid, node, tree, had in pairs:
        try:
            dg = merkle.digest(node, version_of)
            out.append((p, sid, dg, prepare(node, tree, version_of, held, old_version, had, stop)))
        except KeyError:
            continue
        except _Stopped:
            break
    return out


def stale_trees(root: ns.Dir, paths_: Iterable[str]) -> list[ns.Dir]:
    """The live directories at ``paths_`` whose digest is not memoised yet (each once)."""
    out: list[ns.Dir] = []
    seen: set[int] = set()
    for p in paths_:
        node = ns.get(root, paths.split(p))
        if isinstance(node, ns.Dir) and node.digest is None and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def parse_any(data: bytes, sha256: str) -> ParsedRecord | Manifest:
    if record_format(data) == MANIFEST_VERSION:
        return parse_manifest(data, sha256)
    return parse_record(data, sha256)


class QuietGC:
    """The cyclic collector paused for a whole snapshot build or restore, awaits included (the
    worker jobs inside pause it anyway, and it is one switch for the process), and switched on
    again GC_AFTER seconds after the last such operation ends, so the collection their
    allocations call for runs after their replies are out, not before; one that leaves more
    than GC_NOW young objects (a first snapshot of a big tree) has a full collection GC_REPLY
    after it ends instead (once its replies are out; ~0.17 s at 1M files), billed to it rather
    than to a small operation some rounds later (its survivors would bring one on; one that
    starts before it runs has it as it ends), and what survives that pass goes to the permanent generation
    (``gc.freeze``, as the namespace recovered from a checkpoint does): the blocks and block
    infos of a 1M-file tree (~200k objects and the tuples they hold) would otherwise be
    traversed again by every later full pass (Python starts one whenever what reached the
    oldest generation since the last exceeds a quarter of what that one kept), on whatever
    thread allocates, i.e. in front of the loop: ~0.15 s each, ~0.04 s frozen (measured).

    Only objects that just survived a full pass are frozen, so no garbage is; what could leak is
    a cycle among them that becomes garbage later. The namespace, blocks and catalog are acyclic
    (freed by reference counting when dropped), which leaves the state of the requests in
    flight at that moment, once per such operation. A job's temporaries (decoded blocks, the
    encodings shipped, the blocks fetched) are freed by reference counting meanwhile, so the
    collection scans what the operations keep (new directories, cached encodings), not
    everything they made, and not once per worker job on the way; other requests' cycles wait
    until then."""

    def __init__(self) -> None:
        self.active = 0
        self.owed = False  # the collector was on when the first of the running operations began
        self.timer: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.active == 0:
            self.owed = self.owed or gc.isenabled()
            gc.disable()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0 and self.owed:
                big = gc.get_count()[0] > GC_NOW  # a big one (a first snapshot): a full pass once its replies are out
                self.timer = asyncio.get_running_loop().call_later(GC_REPLY if big else GC_AFTER,
                                                                   self._collect if big else self._resume)

    def _resume(self) -> None:
        self.timer = None
        if self.active == 0 and self.owed:
            self.owed = False
            gc.enable()

    def _collect(self) -> None:
        """After a big operation: the collector on, a full pass (its survivors would bring one on
        later) and what survives it kept out of every later one."""
        if self.active == 0 and self.owed:
            self._resume()
            gc.collect()
            gc.freeze()
        self.timer = None


GC_AFTER = 0.05  # seconds after the last snapshot operation before the collector runs again
GC_NOW = 200_000  # ... unless it left more young objects than this: then a full pass GC_REPLY after it ends
GC_REPLY = 0.01  # seconds: its replies (a long poll's, the next poll's) go out before that pass holds the loop


WARM_AFTER = 0.01  # seconds after a change before the trees of snapshotted paths are digested ahead
WARM_SHARE = 0.25  # ... and at most this share of a core's time between passes: a pass that took t waits t * (1 / share - 1)
UNCLAIM_SLICE = 20_000  # claims a finished build drops per turn of the event loop
INLINE_REUSE = 4096  # blocks asked by the last holder's walk up to which the next checks it on the loop
AHEAD_MAX = 16_384  # blocks (and questions of one pass) per path past which none are prepared ahead for it
KEEP_TREES = 2  # snapshot trees kept in memory per path (shared with the live tree but for changes)
BLOCK_BATCH = 4 << 20  # bytes of directory blocks per request
INLINE_PACK = 2048  # blocks of a lone batch up to which it is packed on the event loop ...
INLINE_PACK_RAW = 256 << 10  # ... if it has at most this many bytes of whole blocks left to compress
BLOCK_FETCH = 4096  # digests per block read


def _settle(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)


def _hex_digests(raw: list[Any]) -> list[bytes]:
    out = []
    for d in raw:
        if not (isinstance(d, str) and len(d) == 64):
            raise InvalidArgument("a block digest is 64 hex digits")
        try:
            out.append(bytes.fromhex(d))
        except ValueError as exc:
            raise InvalidArgument("a block digest is 64 hex digits") from exc
    return out


@dataclass
class Walk:
    """A walk for a holder's blocks (see :func:`outgoing`): the blocks it asked about that the
    holder had (held and counted: skipped) and lacked, the blocks it chose, and the catalog's
    ``blocks_gen`` before it began."""
    had: list[bytes]
    lacked: list[bytes]
    items: list[blockdelta.Outgoing]
    gen: int = -1

    def __len__(self) -> int:
        return len(self.had) + len(self.lacked)

    def alike(self, known: set[bytes], counted: dict[bytes, Any], gen: int) -> bool:
        """Whether a holder known to hold ``known`` would answer every question of this walk
        alike (had: in ``known`` and ``counted``; lacked: not in both), so the walk's blocks
        are its blocks; ``gen``: the catalog's ``blocks_gen`` now (unmoved since the walk began:
        what it had is counted still). Set operations in C rather than a pair of lookups per
        question in Python: ~0.03 against ~0.4 ms for ~2,900 questions (100 changed files in
        a 1M-file tree, in process)."""
        if not known.issuperset(self.had):
            return False
        if gen != self.gen and not all(d in counted for d in self.had):
            return False
        return not any(d in counted for d in known.intersection(self.lacked))


@dataclass
class Encoded:
    """One snapshot build's blocks: the directories its digest pass encoded (kept for the build,
    whatever merkle's bounded cache evicts, so shipping does not encode them again) and each
    block compressed once, whichever holders it goes to."""
    kept: merkle.Kept = field(default_factory=dict)
    z: dict[bytes, bytes] = field(default_factory=dict)
    # the previous snapshot tree of the same path: a block goes as a delta against the block at
    # its place there when the holder has that one (see blockdelta); the directories that differ
    # from theirs there (by id), the deltas made (by block and base digest) and the blocks sent
    # as deltas (to send whole if a holder lacks a base after all)
    prev: ns.Dir | None = None
    olds: dict[int, ns.Dir] | None = None
    deltas: dict[bytes, blockdelta.Outgoing] = field(default_factory=dict)
    raw: dict[bytes, bytes] = field(default_factory=dict)
    # blocks a walk left to compress later (see ``deferred``), and each batch of a walk's blocks
    # compressed and packed (by the walk's id and the batch's place), shared by the holders that
    # reuse that walk
    todo: dict[bytes, bytes] = field(default_factory=dict)
    packed: dict[tuple[int, int], tuple[list[blockdelta.Outgoing],
                                        asyncio.Future[tuple[list[blockdelta.Outgoing], bytes]]]] = field(default_factory=dict)
    # the last walk for a holder: the skip answers it asked and the blocks it chose (a holder that
    # would answer every question alike gets the same blocks without walking again)
    walk: Walk | None = None
    batched: tuple[list[blockdelta.Outgoing], list[list[blockdelta.Outgoing]]] | None = None  # a walk's blocks in batches
    # the blocks no committed snapshot counted, with their infos, the commit op's rows of them
    # and their counting planned (see state.RefPlan; None if it could not be), worked out off
    # the loop while the first holder's blocks go out (``infos_job``), and the catalog's
    # blocks_gen before: the commit takes them if it has not moved
    infos: tuple[int, dict[bytes, merkle.BlockInfo], bytes, RefPlan | None] | None = None
    infos_job: asyncio.Future[None] | None = None
    # those blocks' chunk references counted in slices (see precount) as soon as the infos job
    # ends, while the blocks are still on their way: True if counted at that blocks_gen; and
    # whether the commit took them (else they are taken back when the build ends)
    early: asyncio.Future[bool] | None = None
    taken: bool = False
    ended: bool = False  # the build ended: no precount starts after that
    # the work the commit needs and the holders do not (the since-previous diff, the new blocks'
    # infos and their precount): started once each holder of the round has its first request
    # out (``sending``, called as each one's goes), so that it does not hold the interpreter
    # while the blocks are collected, compressed and packed for the holders
    sending: Callable[[], None] | None = None
    start_infos: Callable[[], None] | None = None  # the infos job, off the loop (set by the first collect)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # blocks prepared ahead (see :func:`prepare`), by digest: a block found here goes as prepared
    # when the holder has its base (content-addressed: a delta against a base gives the block
    # whoever made it); whether the holder lacks the block is still decided by the walk
    ahead: Blocks = field(default_factory=dict)
    ahead_raw: dict[bytes, bytes] = field(default_factory=dict)  # their bytes (a leaf there is not encoded again)
    # the blocks claimed for each walk's blocks (by its id; the entry holds them, so the id is not reused)
    claims: dict[int, tuple[list[blockdelta.Outgoing], set[bytes]]] = field(default_factory=dict)
    # the directories whose head blocks the walks chose: marked shipped once the commit counts
    # them (see merkle.mark_shipped)
    visited: list[ns.Dir] = field(default_factory=list)


def outgoing(node: ns.Dir, version_of: merkle.VersionOf, ask: Callable[[bytes], bool], enc: Encoded,
             old_version: merkle.VersionOf, skip: Callable[[bytes], bool] | None = None,
             subst: dict[bytes, bytes] | None = None, deferred: bool = False,
             visited: list[ns.Dir] | None = None) -> list[blockdelta.Outgoing]:
    """The blocks of ``node``'s tree a holder lacks (``ask``: does it have this block, counted),
    children before parents, each compressed once per build: as a delta against the block at
    its place in the previous snapshot tree (``enc.prev``, chunk versions ``old_version``) when
    the holder has that one, else whole. ``skip``: the blocks not to visit, if not those ``ask``
    accepts; ``subst``: the bases of blocks not visited (see :func:`prepare`). ``deferred``: a
    block going whole that is not compressed yet is left so (an empty payload; its bytes in
    ``enc.todo``), for :func:`filled` to compress batch by batch while earlier batches are on
    their way. ``visited``: gets each directory whose head block it chose."""
    z = enc.z
    ahead = enc.ahead
    out = []
    with no_gc():  # acyclic, and a full collection rescans the whole namespace
        if enc.prev is not None and enc.olds is None:
            enc.olds = blockdelta.counterparts(enc.prev, node, ahead)  # (none needed where all is prepared)
        olds = enc.olds or {}
        if subst is None:
            subst = {}  # a block's digest -> its base's (the older block at its place)
        names: dict[int, list[str]] = {}
        for dg, b, d in merkle.iter_blocks(node, version_of, skip or ask, enc.kept, enc.ahead_raw):
            if visited is not None and dg == d.digest:
                visited.append(d)
            it = ahead.get(dg)
            if it is not None and (it.base is None or ask(it.base)):  # prepared ahead
                if it.base is None:
                    z[dg] = it.payload
                else:
                    subst[dg] = it.base
                    enc.deltas[dg + it.base] = it
                    enc.raw[dg] = b
                out.append(it)
                continue
            o = olds.get(id(d))
            if o is not None:  # a delta against the older block at its place, if the holder has it
                older = merkle.older_block(b, o, old_version, subst, ask, names)
                if older is not None:
                    bdg, base = older
                    subst[dg] = bdg
                    it = enc.deltas.get(dg + bdg)
                    if it is None:
                        kind, payload = blockdelta.delta(b, base)
                        it = enc.deltas[dg + bdg] = blockdelta.Outgoing(dg, payload, bdg, kind)
                        enc.raw[dg] = b
                    out.append(it)
                    continue
            got = z.get(dg)
            if got is None:
                if deferred:
                    enc.todo[dg] = b
                    got = b""
                else:
                    got = z[dg] = merkle.compress(b)
            out.append(blockdelta.Outgoing(dg, got))
    return out


def filled(items: list[blockdelta.Outgoing], enc: Encoded) -> list[blockdelta.Outgoing]:
    """``items`` with every block :func:`outgoing` left uncompressed (``deferred``) compressed,
    once per build (``enc.z``), in one call (see :func:`merkle.compress_many`)."""
    z, todo = enc.z, enc.todo
    with no_gc():
        new = list(dict.fromkeys([it.digest for it in items if not it.payload and it.base is None and it.digest not in z]))
        z.update(zip(new, merkle.compress_many([todo[dg] for dg in new]), strict=True))
        return [it if it.payload or it.base is not None else blockdelta.Outgoing(it.digest, z[it.digest])
                for it in items]


def pack_job(items: list[blockdelta.Outgoing], enc: Encoded) -> tuple[list[blockdelta.Outgoing], bytes]:
    """A batch of blocks compressed (see :func:`filled`) and packed for the wire (a worker job)."""
    batch = filled(items, enc)
    return batch, blockdelta.pack(batch)


def inline_pack(items: list[blockdelta.Outgoing], enc: Encoded) -> bool:
    """Whether a batch is small enough to pack on the event loop (~1 ms for the ~500 blocks of
    100 changed files, all prepared or deltas): a worker's job would wait for the loop's
    interpreter lock, and the loop for its (the second holder's claims, the first requests),
    a few ms at 1M files."""
    if len(items) > INLINE_PACK:
        return False
    todo = enc.todo
    return sum(len(todo[it.digest]) for it in items if not it.payload and it.base is None) <= INLINE_PACK_RAW


def groups(items: list[blockdelta.Outgoing], enc: Encoded, limit: int) -> list[list[blockdelta.Outgoing]]:
    """``items`` in consecutive batches of about ``limit`` bytes on the wire (``merkle.batches``;
    a block not compressed yet counted at half its size) or one oversized block alone."""
    todo = enc.todo

    def size_of(it: blockdelta.Outgoing) -> int:
        return len(it.payload) if it.payload or it.base is not None else len(todo[it.digest]) // 2

    return list(merkle.batches(items, limit, size_of))


class _TooMany(Exception):
    pass


class _Stopped(Exception):
    pass


def prepare(node: ns.Dir, prev: ns.Dir, version_of: merkle.VersionOf, held: Callable[[bytes], bool],
            old_version: merkle.VersionOf, had: Ahead, stop: threading.Event | None = None) -> Ahead | None:
    """The blocks of the live tree ``node`` that ``held`` does not accept (the blocks committed
    snapshots count), each made as :func:`outgoing` makes it for a holder that has all of those
    (a delta against the block at its place in ``prev``, the path's latest snapshot tree, else
    whole), by digest, with each block's bytes, added to ``had`` (an earlier pass's against the
    same ``prev``): the walk
    does not visit those, nor what they reach (a block is added after every block below it), so
    a pass costs the blocks new since the last. Raises _Stopped once ``stop`` is set (a snapshot
    or restore is starting); None past AHEAD_MAX blocks (a big change: the snapshot's own
    collect makes them). Only the bytes are prepared: which blocks a holder lacks, and whether
    it has a base, is decided when the snapshot ships."""
    asked = 0

    def ask(d: bytes) -> bool:
        nonlocal asked
        asked += 1
        if asked > AHEAD_MAX:
            raise _TooMany
        if stop is not None and stop.is_set():
            raise _Stopped
        return held(d)

    blocks, raw = had
    subst = {dg: it.base for dg, it in blocks.items() if it.base is not None}
    enc = Encoded(prev=prev, ahead_raw=raw)
    try:
        items = outgoing(node, version_of, ask, enc, old_version, lambda d: d in blocks or ask(d), subst,
                         deferred=True)
    except _TooMany:
        return None
    if not items:
        return had
    items = filled(items, enc)  # the whole blocks compressed; their bytes stay in enc.todo
    got = {**blocks, **{it.digest: it for it in items}}
    made = {**raw, **{it.digest: enc.raw[it.digest] if it.base is not None else enc.todo[it.digest]
                      for it in items}}
    return (got, made) if len(got) <= AHEAD_MAX else None


class Snapshots:
    def __init__(self, m: Master) -> None:
        self.m = m
        self.builders: dict[str, asyncio.Task[Any]] = {}
        self._bad_record_copies: dict[str, set[str]] = {}  # snapshot id -> servers whose copy rotted
        self._record_missing: dict[tuple[str, str], int] = {}  # (server, snapshot id) -> heartbeats without it
        # soft: each path's newest snapshot tree this master built (digests memoised), so the next
        # snapshot of that path reports what changed since without reading anything back, and the
        # trees of the newest KEEP_TREES snapshots per path (a diff of recent ones reads nothing)
        self.latest: dict[str, tuple[str, ns.Dir]] = {}
        self.trees: dict[str, ns.Dir] = {}
        # soft, per chunkserver: the directory blocks it holds as far as this master knows (its
        # full heartbeat, then what was shipped minus what was deleted), the block deletions
        # released in the last heartbeat reply (done by its next heartbeat), and how many block
        # deletions were ever released to it (a build re-checks its holders when that moved)
        self.known: dict[str, set[bytes]] = {}
        self.deleting: dict[str, set[bytes]] = {}
        self.gen: dict[str, int] = {}
        self.claimed: dict[bytes, int] = {}  # blocks a build shipped and has not committed yet
        self._unclaiming: set[asyncio.Task[None]] = set()  # big builds' clean-up going in slices
        self.quiet_gc = QuietGC()
        # the live trees of the paths in ``latest`` are digested ahead of their next snapshot, in
        # a worker thread, WARM_AFTER after a change (or later, so that passes take at most
        # WARM_SHARE of a core under a stream of changes): directories' digests are memoised on the immutable nodes,
        # so that snapshot's own digest pass finds all but the last few changes done
        self._warm_timer: asyncio.TimerHandle | None = None
        self._warming: asyncio.Future[tuple[int, list[Prepared]]] | None = None
        self._warm_took = 0.0
        # ... and their blocks prepared ahead against the path's latest snapshot tree (see
        # prepare): per path, that snapshot's id, the live tree's digest they were made for and
        # the blocks; and the paths whose live tree changed too much since their latest snapshot
        # (its id) to prepare them (the snapshot's own collect does)
        self.ahead: dict[str, tuple[str, bytes, Ahead]] = {}
        self._ahead_off: dict[str, str] = {}
        self._stop_ahead = threading.Event()  # set: a build or restore is waiting for the pass
        # the long polls waiting for each running build (see wait_built), and the running builds
        # whose commit is durable (answered before their last steps: the log line, metrics, clean-up)
        self.waiting: dict[str, list[asyncio.Future[None]]] = {}
        self.answered: set[str] = set()

    def changed(self) -> None:
        """The namespace changed (called for every op the master applies): digest the live
        trees of snapshotted paths soon, unless that is scheduled or running already. A pass
        does not start while a build or restore runs (they pause the collector, see QuietGC;
        a build digests the tree itself); their ops schedule the next. Digests memoised on live
        nodes are what every snapshot already leaves on the nodes the live tree shares with it:
        whatever changes a directory's encoding (an entry, a chunk's version: see
        MasterState._apply_bump) makes new nodes on its path."""
        if self.latest and self._warm_timer is None and self._warming is None:
            self._warm_timer = asyncio.get_running_loop().call_later(
                max(WARM_AFTER, self._warm_took * (1 / WARM_SHARE - 1)), self._warm)

    def _warm(self) -> None:
        self._warm_timer = None
        if self._warming is not None or self.quiet_gc.active or any(not t.done() for t in self.builders.values()):
            return  # a build digests them itself (its commit is a change: it schedules the next)
        root = self.m.state.root
        todo = stale_trees(root, self.latest)
        pairs = self._ahead_todo(root)
        if not todo and not pairs:
            return
        t0 = time.perf_counter()
        version_of = self.m.state.version.__getitem__
        held = self.m.state.blocks.__contains__
        stop = self._stop_ahead
        stop.clear()

        def job() -> tuple[int, list[Prepared]]:
            return warm_job(todo, version_of), ahead_job(pairs, version_of, held, self._live_version, stop)

        fut = self._warming = asyncio.get_running_loop().run_in_executor(None, job)

        def done(f: asyncio.Future[tuple[int, list[Prepared]]]) -> None:
            self._warming = None
            self._warm_took = time.perf_counter() - t0
            if not f.cancelled() and f.exception() is not None:
                log.warning("digesting snapshotted trees ahead failed: %s", f.exception())
            elif not f.cancelled():
                for p, sid, dg, got in f.result()[1]:
                    if self.latest.get(p, ("",))[0] != sid:
                        continue  # snapshotted again meanwhile
                    if got is None:
                        self._ahead_off[p] = sid
                        self.ahead.pop(p, None)
                    else:
                        self.ahead[p] = (sid, dg, got)
            self.changed()  # what changed while it ran

        fut.add_done_callback(done)

    def _ahead_todo(self, root: ns.Dir) -> list[tuple[str, str, ns.Dir, ns.Dir, Ahead]]:
        """(path, latest snapshot id, live tree, latest snapshot tree, the blocks prepared so far)
        of each snapshotted path whose live tree's blocks are not prepared yet (those of a path
        no longer snapshotted are dropped)."""
        for gone in [p for p in self.ahead if p not in self.latest]:
            del self.ahead[gone]
        out = []
        for p, (sid, tree) in self.latest.items():
            node = ns.get(root, paths.split(p))
            if not isinstance(node, ns.Dir) or self._ahead_off.get(p) == sid:
                continue
            cur = self.ahead.get(p)
            if cur is not None and cur[0] == sid and node.digest is not None and cur[1] == node.digest:
                continue
            out.append((p, sid, node, tree, cur[2] if cur is not None and cur[0] == sid else ({}, {})))
        return out

    def ahead_of(self, path: str, prev_sid: str) -> Ahead:
        """The blocks prepared ahead for ``path``'s next snapshot against snapshot ``prev_sid``."""
        cur = self.ahead.get(path)
        return cur[2] if cur is not None and cur[0] == prev_sid else ({}, {})

    async def warmed(self) -> None:
        """Wait for a running pass of :meth:`_warm` (a build's digest pass would repeat its work
        beside it); its preparing of blocks stops at once (what it prepared before stays)."""
        fut = self._warming
        self._stop_ahead.set()
        if fut is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

    def snap_json(self, e: ops.SnapshotEntry) -> wire.SnapshotInfo:
        """A snapshot as answered; ``pending`` until its commit is durable (its build answered its
        waiters, or ended): the commit is applied (``ready`` in memory) before it is durable, and
        nothing is acknowledged before that."""
        out = {k: v for k, v in e.items() if k not in ("handles_z", "created_ns")}
        out["live_copies"] = self.live_copies(e)
        task = self.builders.get(e["id"])
        if out["state"] == "ready" and task is not None and not task.done() and e["id"] not in self.answered:
            out["state"] = "pending"
        return cast(wire.SnapshotInfo, out)

    def live_copies(self, e: ops.SnapshotEntry) -> int:
        """Holders of a record copy that are alive (each copy is checked against the catalog at
        every heartbeat, see _check_record_copies)."""
        return sum(1 for h in e["holders"] if h["id"] in self.m.chunkmap.cs and self.m.chunkmap.cs[h["id"]].alive)

    def under_copied(self) -> int:
        n = sum(1 for e in self.m.state.snapshots.values()
                if e["state"] == "ready" and self.live_copies(e) < e["copies"])
        M.M_SNAP_UNDER_COPIED.set(n)
        return n

    async def create(self, sid: str, name: str, path: str, copies: int, targets: list[str],
                     near: dict[str, Any], labels: dict[str, str], wait: float) -> ops.SnapshotEntry:
        """Capture a snapshot (O(1), logged), build and ship its record in the background; wait
        up to ``wait`` seconds for it. An existing ``sid`` with the same name and path is a retry."""
        st = self.m.state
        if sid in st.snapshots:
            e = st.snapshots[sid]
            if e["name"] != name or e["path"] != path:
                raise Conflict(f"snapshot id {sid} already exists with another name or path")
            await self.wait_built(sid, wait)
            e = st.snapshots[sid]
            return e
        if name in st.snapshot_names:
            raise AlreadyExists(f"a snapshot named {name!r} already exists")
        st.lookup(path)  # must exist
        op = ops.SnapCapture(op="snap_capture", id=sid, name=name, path=path, created=now_ns(),
                             copies=copies, targets=targets, near=Location.from_json(near).to_json(),
                             labels=labels)
        # O(1): pins the current immutable root. The build starts on it at once, while the op
        # becomes durable: its commit is logged after this op, so durable only after it, and
        # what it ships before a crash that loses this op is garbage to the recovered master
        _result, durable = self.m.submit(op, apply_seconds=M.M_SNAP_CAPTURE)
        self.start_builder(sid)
        await durable
        await self.wait_built(sid, wait)
        e = st.snapshots[sid]
        return e

    async def wait_built(self, sid: str, wait: float) -> None:
        """Long poll: give a small snapshot the chance to be ready in the same request (answered
        as soon as its commit is durable, see :meth:`_answer`). A build that ended because the
        operation log failed leaves its commit applied, never durable: that is not answered (the
        master must restart)."""
        task = self.builders.get(sid)
        if wait > 0 and task is not None and not task.done() and sid not in self.answered:
            loop = asyncio.get_running_loop()
            w: asyncio.Future[None] = loop.create_future()
            self.waiting.setdefault(sid, []).append(w)
            timer = loop.call_later(wait, _settle, w)
            try:
                await w
            finally:
                timer.cancel()
                mine = self.waiting.get(sid)
                if mine is not None and w in mine:
                    mine.remove(w)
        if self.m.oplog.failed is not None:
            raise Unavailable(f"the operation log failed ({self.m.oplog.failed}); the master must restart")

    def start_builder(self, sid: str) -> None:
        if sid not in self.builders or self.builders[sid].done():
            task = self.builders[sid] = asyncio.create_task(self.build(sid))
            task.add_done_callback(lambda _t: self._answer(sid))  # (however it ended)

    def _answer(self, sid: str, durable: bool = False) -> None:
        """Wake the long polls waiting for build ``sid``: its commit is ``durable`` (it shows
        ready from now on), or the build ended. Each waiter's task runs in the next turn of the
        loop, before whatever the build does after an ``await asyncio.sleep(0)``."""
        if durable:
            self.answered.add(sid)
        for w in self.waiting.pop(sid, []):
            _settle(w)

    def rank_holders(self, entry: ops.SnapshotEntry, prefer: set[str] | None = None) -> list[tuple[ChunkserverInfo, str]]:
        """Chunkservers for a record, nearest first (``targets`` first if given); ``prefer``:
        ids to take first where the ranking allows (the holders of the previous snapshot of the
        same path, which have most of its blocks already)."""
        ref = Location.from_json(entry.get("near")) if entry.get("near") else self.m.location
        if not (ref.node or ref.zone or ref.region or ref.ip):
            ref = self.m.location
        alive = {c.id: c for c in self.m.chunkmap.alive()}
        ranked = find_nearest(ref, [c.candidate() for c in alive.values()])
        targets = entry.get("targets") or []
        if targets:
            by_addr = {c.address: c.id for c in alive.values()}
            by_addr.update({urlsplit(c.address).hostname or "": c.id for c in alive.values()})
            order = [by_addr.get(t, t) for t in targets]
            pos = {cid: i for i, cid in enumerate(order)}
            ranked.sort(key=lambda r: pos.get(r.candidate.id, len(order)))
        if prefer and not targets:
            ranked.sort(key=lambda r: r.candidate.id not in prefer)
        ranked = diversify(ranked, entry["copies"]) if not targets else ranked
        return [(alive[r.candidate.id], r.reason) for r in ranked]

    async def build(self, sid: str) -> None:
        """:meth:`_build` with the cyclic collector paused throughout (see :class:`QuietGC`),
        after a pass digesting the tree ahead (see :meth:`changed`) ends: its own pause of the
        collector would end inside this one's otherwise, and the pass does the work this build's
        digest pass starts with."""
        await self.warmed()
        with self.quiet_gc():
            await self._build(sid)

    async def _build(self, sid: str) -> None:
        """Build and ship snapshot ``sid``'s record, then commit it. A directory snapshot is
        format 3: its root digest (memoised on the pinned immutable tree, so after a small change
        this re-encodes only the changed directories, on a worker thread, no fork) and, to each
        holder, only the directory blocks it lacks. A file snapshot is a format-2 record."""
        st = self.m.state
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.m.opts.snapshot_retry_seconds
        loop = asyncio.get_running_loop()
        claimed: list[bytes] = []
        enc = Encoded()
        since: asyncio.Future[tuple[str, dict[str, Any]]] | None = None
        try:
            entry = st.snapshots[sid]
            pin = st.pins[sid]
            node = pin.node
            meta = {k: entry[k] for k in ("id", "name", "path", "created", "epoch")}
            meta["chunk_size"] = st.chunk_size
            version_of = st.version.__getitem__  # the pin protects every chunk it reaches
            rec = None
            if isinstance(node, ns.Dir):
                dg = node.digest  # memoised (digested ahead, or unchanged since a snapshot): no worker's hop
                if dg is None:
                    dg = await loop.run_in_executor(None, merkle.digest, node, version_of, enc.kept)
                files, dirs, nchunks, size = merkle.stats(node, version_of)
                counts = {"files": files, "dirs": dirs, "chunks": nchunks, "bytes": size}
                data, sha = build_manifest(meta, dg, counts)
            else:
                rec = await loop.run_in_executor(None, build_record, meta, node, version_of)
                data, sha, counts = rec.data, rec.sha256, rec.counts
            # what changed since the previous snapshot (for its status) and the new blocks' infos
            # (the commit's rows) are worked out while the holders store the blocks: once every
            # holder of the round has its first request out (beside the collect and the packing
            # they would take the interpreter from them); the commit is the first to need them

            def start_since() -> None:
                nonlocal since
                if since is None:
                    since = asyncio.ensure_future(self.since_previous(entry, node))

            room_made = False

            def behind() -> None:
                nonlocal room_made
                start_since()
                if enc.start_infos is not None:
                    enc.start_infos()
                if isinstance(node, ns.Dir) and not room_made:  # (the trees freed here, while the holders work)
                    self.make_room(entry["path"])
                    room_made = True

            unsent = 0  # holders of the round whose first request is not out yet

            def sending() -> None:
                nonlocal unsent
                unsent -= 1
                if unsent == 0:  # two turns on: the request's body is written by a task it starts
                    loop.call_soon(loop.call_soon, behind)

            enc.sending = sending
            t_built = time.perf_counter()
            holders: list[dict[str, Any]] = []
            shipped: dict[str, int] = {}
            gens: dict[str, int] = {}
            last_err = "no live chunkserver"
            delay = 0.5
            headers = {"X-Kubegfs-Sha256": sha, "X-Kubegfs-Snapshot-Name": entry["name"],
                       "X-Kubegfs-Created": entry["created"]}

            async def ship(cs: ChunkserverInfo, reason: str) -> dict[str, Any] | None:
                nonlocal last_err
                try:
                    carried = False
                    if isinstance(node, ns.Dir):
                        shipped[cs.id], carried = await self.ship_blocks(cs, node, version_of, claimed, gens, enc,
                                                                         (sid, data, headers))
                    if not carried:
                        await self.m.call_cs(cs, "PUT", f"/internal/records/{sid}", data=data, headers=headers)
                        shipped[cs.id] = shipped.get(cs.id, 0) + len(data)
                except PEER_ERRORS as exc:
                    last_err = f"{cs.id}: {exc}"
                    log.warning("snapshot %s: shipping to %s failed: %s", sid, cs.id, exc)
                    return None
                cs.records.add(sid)
                self.m.outbox.cancel(cs.id, "record", sid)
                return {"id": cs.id, "address": cs.address, **cs.location.to_json(), "reason": reason}

            prev = self.previous_of(entry) if isinstance(node, ns.Dir) else None
            enc.prev = prev[1] if prev else None
            enc.ahead, enc.ahead_raw = self.ahead_of(entry["path"], prev[0]) if prev else ({}, {})
            prefer = {h["id"] for h in st.snapshots[prev[0]]["holders"]} if prev else set()
            ranked: list[tuple[ChunkserverInfo, str]] = []
            while True:
                # ship to the nearest candidates at once; fall back down the ranking for failures
                tried: set[str] = set()
                while len(holders) < entry["copies"]:
                    ranked = self.rank_holders(entry, prefer)
                    todo = [(cs, why) for cs, why in ranked
                            if cs.id not in tried and all(h["id"] != cs.id for h in holders)]
                    todo = todo[: entry["copies"] - len(holders)]
                    if not todo:
                        break
                    tried |= {cs.id for cs, _ in todo}
                    unsent = len(todo)
                    done = await asyncio.gather(*(ship(cs, why) for cs, why in todo))
                    holders += [h for h in done if h is not None]
                if holders or time.monotonic() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            # keep the ranking's order (nearest first) whatever order the copies finished in (the
            # last round's ranking: one per round, not one more for this)
            rank = {cs.id: i for i, (cs, _why) in enumerate(ranked)}
            holders.sort(key=lambda h: rank.get(h["id"], len(rank)))
            if isinstance(node, ns.Dir):
                holders = await self._recheck_holders(holders, node, version_of, claimed, gens, enc)
            behind()  # (if a holder failed before its first request, or none had blocks to get)
            assert since is not None
            root_hex, changes = await since
            if enc.infos_job is not None:
                await enc.infos_job
            if not holders:
                await self.m.mutate({"op": "snap_fail", "id": sid, "error": f"no chunkserver took the record: {last_err}"})
                M.M_SNAP_RESULT.labels("failed").inc()
                return
            dur = time.perf_counter() - t0
            t_shipped = time.perf_counter()
            op = ops.SnapCommit(
                op="snap_commit", id=sid, sha256=sha, record_bytes=len(data),
                holders=holders, files=counts["files"], dirs=counts["dirs"],
                chunks=counts["chunks"], logical_bytes=counts["bytes"],
                duration_seconds=round(dur, 6), location_reason=holders[0]["reason"],
                root=root_hex, changes=changes, shipped_bytes=shipped.get(holders[0]["id"], 0),
            )
            if rec is None:
                assert isinstance(node, ns.Dir)
                # no await from here (or from a precount that kept to its blocks_gen) to the
                # apply inside mutate: the blocks the op carries are exactly those the catalog
                # does not count yet (as the infos job found them, off the loop while the blocks
                # shipped, with their rows, if no block was counted or uncounted since)
                pre = enc.infos
                early = await enc.early if enc.early is not None else False
                if early and pre is not None and pre[0] != st.blocks_gen:  # a block counted or released since
                    enc.taken = True
                    await precount.release(st, pre[1])
                    early = False
                if early and pre is not None:
                    enc.taken = True
                    infos, op["blocks"], op["_precounted"] = pre[1], pre[2], True  # counted in slices
                    op["_plan"] = pre[3]
                elif pre is not None and enc.early is None and len(pre[1]) >= precount.PRECOUNT_MIN \
                        and await precount.precount(st, pre[0], pre[1]):
                    infos, op["blocks"], op["_precounted"] = pre[1], pre[2], True  # counted in slices
                    op["_plan"] = pre[3]
                elif pre is not None and pre[0] == st.blocks_gen:
                    infos, op["blocks"] = pre[1], pre[2]
                    op["_plan"] = pre[3]
                else:
                    infos = merkle.new_block_infos(node, version_of, st.blocks.__contains__)
                    with no_gc():  # a row per new block: a full collection would rescan the namespace
                        op["blocks"] = encode_block_infos_z(infos)
                op["_infos"] = infos
            else:
                # count the snapshot's chunk references in slices so writers never wait long; the
                # snapshot is still pending, so every chunk in it is treated as shared meanwhile
                for i in range(0, len(rec.handles), 20_000):
                    st.count_snapshot_refs(rec.handles[i : i + 20_000])
                    await asyncio.sleep(0)
                op["handles_z"] = rec.handles_z
                op["_precounted"] = True
            _result, durable = self.m.submit(op)
            # (soft state, kept while the commit becomes durable; the trees it lets go are freed
            # once the answer is out)
            let_go = self.remember_tree(entry["path"], sid, node) if isinstance(node, ns.Dir) else []
            merkle.mark_shipped(enc.visited)  # (counted now: the next versions' walks start from them)
            await durable
            # the long polls are answered first; the log line, metrics and the clean-up after
            self._answer(sid, durable=True)
            await asyncio.sleep(0)
            let_go.clear()
            M.M_SNAP_BUILD.observe(dur)
            M.M_SNAP_RECORD.observe(len(data))
            M.M_SNAP_RESULT.labels("success").inc()
            log.info("snapshot %s (%s) of %s ready: %d files, %d bytes shipped per copy to %s in %.3fs "
                     "(built %.3fs, shipped %.3fs, committed %.3fs)",
                     entry["name"], sid, entry["path"], counts["files"], op["shipped_bytes"],
                     ",".join(h["id"] for h in holders), time.perf_counter() - t0, t_built - t0,
                     t_shipped - t_built, time.perf_counter() - t_shipped)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("snapshot %s failed", sid)
            if sid in st.pins:
                await self.m.mutate({"op": "snap_fail", "id": sid, "error": str(exc)})
                M.M_SNAP_RESULT.labels("failed").inc()
        finally:
            if since is not None and not since.done():
                since.cancel()
            elif since is not None and not since.cancelled():
                since.exception()  # retrieved: the build failed or used its result already
            job = enc.infos_job
            if job is not None:  # retrieved whenever it ends (the build may have failed before it did)
                job.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._drop_early(enc)
            if len(claimed) > UNCLAIM_SLICE:  # a big build's: in slices (a block stays claimed a little longer)
                self._later(self.unclaim_slices(claimed[:]))
                claimed.clear()
            else:
                self.unclaim(claimed)
            self.builders.pop(sid, None)
            self._answer(sid)
            self.answered.discard(sid)

    # ------------------------------------------------------------------ directory blocks

    def _later(self, job: Coroutine[Any, Any, None]) -> None:
        """Run a build's clean-up in slices after it (kept referenced until done)."""
        task = asyncio.ensure_future(job)
        self._unclaiming.add(task)
        task.add_done_callback(self._unclaiming.discard)

    def _precount_early(self, enc: Encoded) -> None:
        """Once the infos job ended: count its blocks' chunk references in slices while the blocks
        are still on their way (``Encoded.early``), however few: the commit's apply, on the path
        to the answer, then only adds the blocks' rows (~1 ms of counting after 100 changed
        files at 100k-1M files, done while the holders work)."""
        pre = enc.infos
        if pre is not None and enc.early is None and not enc.ended and pre[1]:
            enc.early = asyncio.ensure_future(precount.precount(self.m.state, pre[0], pre[1]))

    def _drop_early(self, enc: Encoded) -> None:
        """As a build ends: the references its early precount counted, unless its commit took
        them, are taken back (a precount still running stops and takes back what it counted)."""
        enc.ended = True
        early = enc.early
        if early is None or enc.taken:
            return
        if not early.done():
            early.cancel()
        elif not early.cancelled() and early.exception() is None and early.result():
            assert enc.infos is not None
            self._later(precount.release(self.m.state, enc.infos[1]))

    async def unclaim_slices(self, digests: list[bytes]) -> None:
        """:meth:`unclaim`, a slice per turn of the event loop (a first 1M snapshot's ~170k
        claims would hold it ~0.1-0.3 s)."""
        for i in range(0, len(digests), UNCLAIM_SLICE):
            self.unclaim(digests[i : i + UNCLAIM_SLICE])
            await asyncio.sleep(0)

    def unclaim(self, digests: list[bytes]) -> None:
        for dg in digests:
            n = self.claimed.get(dg, 0) - 1
            if n > 0:
                self.claimed[dg] = n
            else:
                self.claimed.pop(dg, None)
        digests.clear()

    async def fence(self, cs: ChunkserverInfo, digests: set[bytes] | None = None) -> None:
        """Wait until block deletions released to ``cs`` (all, or those of ``digests``) are done
        (its next heartbeat), so a block shipped now is not deleted by an older order."""
        deadline = time.monotonic() + max(5.0, 2 * self.m.opts.dead_after)
        while True:
            pending = self.deleting.get(cs.id)
            if not pending or (digests is not None and not (pending & digests)):
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"{cs.id} has not confirmed its block deletions")
            await asyncio.sleep(0.02)

    async def ship_blocks(self, cs: ChunkserverInfo, node: ns.Dir, version_of: merkle.VersionOf,
                          claimed: list[bytes], gens: dict[str, int], enc: Encoded,
                          record: tuple[str, bytes, dict[str, str]] | None = None) -> tuple[int, bool]:
        """Ship ``cs`` the blocks of ``node``'s tree it lacks; returns the bytes sent and whether
        ``record`` (snapshot id, bytes, headers) went with the last batch (one round trip: the
        holder stores it once that batch is durable; any refusal of the two together sends the
        batch alone, for the caller to put the record after it). A block is skipped only if
        ``cs`` holds it and a committed snapshot counts it (then nothing deletes it or anything
        it reaches); every block sent is claimed (never deleted) until the build commits or fails."""
        await self.fence(cs)
        gens[cs.id] = self.gen.get(cs.id, 0)
        known = self.known.setdefault(cs.id, set())
        counted = self.m.state.blocks

        def skip(d: bytes) -> bool:
            return d in known and d in counted

        def reused() -> list[blockdelta.Outgoing] | None:
            """The last holder's walk, if this one answers every question alike."""
            if enc.walk is None or not enc.walk.alike(known, counted, self.m.state.blocks_gen):
                return None
            return enc.walk.items

        def collect() -> list[blockdelta.Outgoing]:  # off the loop; compressed batch by batch (``filled``)
            got = reused()
            if got is not None:
                return got
            had: list[bytes] = []
            lacked: list[bytes] = []
            gen = self.m.state.blocks_gen

            def ask(d: bytes) -> bool:
                if skip(d):
                    had.append(d)
                    return True
                lacked.append(d)
                return False

            out = outgoing(node, version_of, ask, enc, self._live_version, deferred=True, visited=enc.visited)
            enc.walk = Walk(had, lacked, out, gen)
            return out

        def infos() -> None:  # off the loop, while the blocks are on their way (the commit needs them)
            st = self.m.state
            gen = st.blocks_gen
            got = merkle.new_block_infos(node, version_of, counted.__contains__)
            with no_gc():  # a row per new block (see the commit)
                rows = encode_block_infos_z(got)
                # and their counting, so that the commit's apply only installs it (see RefPlan)
                plan = st.plan_blocks(merkle.digest(node, version_of), got, gen)
                enc.infos = (gen, got, rows, plan)

        def start_infos() -> None:
            if enc.infos is None and enc.infos_job is None:
                enc.infos_job = loop.run_in_executor(None, infos)
                enc.infos_job.add_done_callback(lambda _f: self._precount_early(enc))

        loop = asyncio.get_running_loop()
        parts: list[list[blockdelta.Outgoing]] = []

        def packing(i: int) -> asyncio.Future[tuple[list[blockdelta.Outgoing], bytes]]:
            key = (id(items), i)  # (the entry holds ``items``: its id is not reused meanwhile)
            got = enc.packed.get(key)
            if got is not None:
                return got[1]
            if len(parts) == 1 and inline_pack(parts[0], enc):  # a small change's one batch: on the loop
                fut = loop.create_future()
                fut.set_result(pack_job(parts[0], enc))
                enc.packed[key] = (items, fut)
                return fut
            fut = loop.run_in_executor(None, pack_job, parts[i], enc)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved if no holder awaits it
            enc.packed[key] = (items, fut)
            return fut

        async with enc.lock:  # the holders' collects one at a time: the next reuses the walk or the compression
            # a holder with the root (counted) lacks nothing: an unchanged tree ships no block
            got: list[blockdelta.Outgoing] | None = [] if node.digest is not None and skip(node.digest) else None
            # a short walk's check is a few dict lookups: on the loop, not worth a worker's hop
            if got is None and enc.walk is not None and len(enc.walk) <= INLINE_REUSE:
                got = reused()
            items = got if got is not None else await loop.run_in_executor(None, collect)
            if enc.batched is not None and enc.batched[0] is items:  # the same walk's: the same batches
                parts = enc.batched[1]
            else:
                parts = groups(items, enc, BLOCK_BATCH)
                enc.batched = (items, parts)
            # the first batch is packed at once: until it is on its way the holder has nothing to do
            ahead = packing(0) if parts else None
            if enc.infos is None and enc.infos_job is None:
                if node.digest is not None and node.digest in counted:
                    infos()  # no new block: nothing to walk, on the loop
                elif enc.start_infos is None:
                    enc.start_infos = start_infos
        # every block sent, and every base a delta needs, is claimed (not deleted) until the build
        # ends: once per build for the blocks of one walk (a holder reusing it adds no claim)
        held = enc.claims.get(id(items))
        if held is None:
            needed = {it.digest for it in items} | {it.base for it in items if it.base is not None}
            for dg in needed:
                self.claimed[dg] = self.claimed.get(dg, 0) + 1
                claimed.append(dg)
            enc.claims[id(items)] = (items, needed)
        else:
            needed = held[1]
        await self.fence(cs, needed)  # a deletion released while collecting
        # one batch at a time, children before parents: whatever part of them reaches the holder
        # (durable batch by batch), each block it has reaches only blocks it has. The next batch
        # is compressed and packed in a worker while one is on its way (holders that reuse the
        # same walk share that work: see ``Encoded.packed``)
        sent = 0
        carried = False
        for i in range(len(parts)):
            assert ahead is not None
            batch, body = await asyncio.shield(ahead)
            ahead = packing(i + 1) if i + 1 < len(parts) else None
            if i == 0 and enc.sending is not None:
                enc.sending()
            if record is not None and i == len(parts) - 1:
                carried = await self._with_record(cs, body, record)
                if carried:
                    sent += len(body) + len(record[1])
                    known.update(it.digest for it in batch)
                    continue
            try:
                await self.m.call_cs(cs, "POST", "/internal/blocks/delta", data=body)
            except (Conflict, CorruptData) as exc:  # a base it lacks after all (damaged): send them whole
                if not any(it.base is not None for it in batch):
                    raise
                log.warning("%s refused block deltas (%s); sending those blocks whole", cs.id, exc)
                body = blockdelta.pack([it if it.base is None else
                                        blockdelta.Outgoing(it.digest, merkle.compress(enc.raw[it.digest]))
                                        for it in batch])
                await self.m.call_cs(cs, "POST", "/internal/blocks/delta", data=body)
            sent += len(body)
            known.update(it.digest for it in batch)
        if not parts and enc.sending is not None:
            enc.sending()  # (its first request is the record's)
        M.M_SNAP_BLOCKS_SHIPPED.inc(len(items))
        return sent, carried

    async def _with_record(self, cs: ChunkserverInfo, body: bytes, record: tuple[str, bytes, dict[str, str]]) -> bool:
        """Send a batch of blocks with the snapshot's record after it in one request; False if the
        holder refused the two (e.g. a base it lacks) or did not store the record (a holder that
        does not know the headers would have refused the body)."""
        sid, data, headers = record
        try:
            got = await self.m.call_cs(cs, "POST", "/internal/blocks/delta", data=body + data,
                                       headers={**headers, "X-Kubegfs-Record": sid,
                                                "X-Kubegfs-Record-Length": str(len(data))})
        except (Conflict, CorruptData, InvalidArgument) as exc:
            log.info("%s refused blocks with the record (%s); sending them apart", cs.id, exc)
            return False
        return isinstance(got, dict) and isinstance(got.get("record"), dict)

    async def _recheck_holders(self, holders: list[dict[str, Any]], node: ns.Dir, version_of: merkle.VersionOf,
                               claimed: list[bytes], gens: dict[str, int], enc: Encoded) -> list[dict[str, Any]]:
        """A holder that had block deletions released since its blocks were chosen may have lost
        a block the build relied on: ship to it again (until none moved)."""
        for _round in range(10):
            stale = [h for h in holders if self.gen.get(h["id"], 0) != gens.get(h["id"], 0)]
            if not stale:
                return holders
            for h in stale:
                cs = self.m.chunkmap.cs.get(h["id"])
                try:
                    if cs is None:
                        raise Unavailable(f"{h['id']} is gone")
                    await self.ship_blocks(cs, node, version_of, claimed, gens, enc)
                except PEER_ERRORS as exc:
                    log.warning("re-shipping blocks to %s failed: %s", h["id"], exc)
                    holders = [x for x in holders if x["id"] != h["id"]]
        return [h for h in holders if self.gen.get(h["id"], 0) == gens.get(h["id"], 0)]

    def blocks_heartbeat(self, cs: ChunkserverInfo, b: dict[str, Any], full: bool) -> None:
        """Fold a heartbeat's block report in: the deletions released in the previous reply are
        done; a full report is what ``cs`` holds (any block no committed snapshot counts is
        ordered deleted: mark and sweep); garbage blocks it holds are ordered deleted."""
        st = self.m.state
        self.deleting.pop(cs.id, None)
        known = self.known.setdefault(cs.id, set())
        if full:
            raw = b.get("blocks") or []
            if not isinstance(raw, list):
                raise InvalidArgument("blocks must be a list of hex digests")
            known.clear()
            known.update(_hex_digests(raw))
            for dg in known:
                if dg not in st.blocks:
                    self.m.outbox.order(cs.id, "block", dg.hex())
        dropped = b.get("blocks_dropped") or []
        if not isinstance(dropped, list):
            raise InvalidArgument("blocks_dropped must be a list of hex digests")
        if dropped:  # what reaches a dropped block is not whole here any more: trust nothing
            _hex_digests(dropped)
            known.clear()
            log.error("%s dropped %d damaged directory blocks; it gets every block again with the "
                      "next snapshot it holds", cs.id, len(dropped))
        for dg in st.garbage_blocks & known:
            self.m.outbox.order(cs.id, "block", dg.hex())

    def blocks_released(self, cs_id: str, released: list[str]) -> None:
        if not released:
            return
        gone = set(_hex_digests(released))
        self.known.get(cs_id, set()).difference_update(gone)
        self.deleting[cs_id] = gone
        self.gen[cs_id] = self.gen.get(cs_id, 0) + 1
        garbage = self.m.state.garbage_blocks
        for dg in gone & garbage:
            if not any(dg in k for k in self.known.values()):
                garbage.discard(dg)

    def block_still_wanted(self, key: str) -> bool | None:
        dg = bytes.fromhex(key)
        if dg in self.m.state.blocks:
            return False
        return None if dg in self.claimed else True

    async def fetch_blocks(self, e: ops.SnapshotEntry, digests: list[bytes]) -> dict[bytes, bytes]:
        """Blocks of snapshot ``e`` from its nearest live holder, verified, in batches; what one
        holder cannot give comes from the next."""
        want = list(dict.fromkeys(digests))
        got: dict[bytes, bytes] = {}
        errors: list[str] = []
        for cs in self._ranked_holders(e):
            for i in range(0, len(want), BLOCK_FETCH):
                part = [d for d in want[i:i + BLOCK_FETCH] if d not in got]
                if not part:
                    continue
                try:
                    got.update(await self._get_blocks(cs, part))
                except (NotFound, CorruptData) as exc:
                    errors.append(f"{cs.id}: {exc}")
                    break
                except PEER_ERRORS as exc:
                    errors.append(f"{cs.id}: {exc}")
                    break
            if all(d in got for d in want):
                return got
        raise Unavailable(f"no holder of snapshot {e['name']} could give {sum(d not in got for d in want)} "
                          "directory blocks: " + ("; ".join(errors) or "no live holder"))

    async def _get_blocks(self, cs: ChunkserverInfo, digests: list[bytes]) -> list[tuple[bytes, bytes]]:
        assert self.m._session is not None
        async with self.m._session.post(f"{cs.address}/internal/blocks/get",
                                        json={"digests": [d.hex() for d in digests]}) as resp:
            if resp.status != 200:
                raise from_json(resp.status, await resp.json(content_type=None))
            body = await resp.read()
        return merkle.unpack_frames(body)  # each verified against its digest

    def _ranked_holders(self, e: ops.SnapshotEntry) -> list[ChunkserverInfo]:
        holders = [cs for h in e.get("holders", []) if (cs := self.m.chunkmap.cs.get(h["id"])) and cs.alive]
        ranked = find_nearest(self.m.location, [c.candidate() for c in holders])
        return [self.m.chunkmap.cs[r.candidate.id] for r in ranked]

    async def copy_closure(self, e: ops.SnapshotEntry, root: bytes, target: ChunkserverInfo) -> None:
        """Give ``target`` every block of snapshot ``e`` it lacks, read from the other holders
        (level by level; a block counted in the catalog that ``target`` holds is skipped with
        everything below it)."""
        known = self.known.setdefault(target.id, set())
        counted = self.m.state.blocks
        level, seen = [root], set()
        while level:
            need = [d for d in dict.fromkeys(level) if d not in seen and not (d in known and d in counted)]
            seen.update(need)
            if not need:
                break
            got = await self.fetch_blocks({**e, "holders": [h for h in e["holders"] if h["id"] != target.id]}, need)
            items = [(d, got[d]) for d in need]
            await self.fence(target, set(need))
            for batch in merkle.batches(items, BLOCK_BATCH):
                await self.m.call_cs(target, "POST", "/internal/blocks", data=merkle.pack_frames(batch))
                known.update(d for d, _b in batch)
            level = [c for d in need for c in merkle.child_digests(got[d])]

    def _live_version(self, h: int) -> int:
        return self.m.state.version.get(h, 0)

    async def tree_ref(self, e: ops.SnapshotEntry) -> tuple[merkle.DirRef, merkle.VersionOf]:
        """Snapshot ``e``'s root: the tree in memory if this master built it last for its path,
        else the root digest of its record (format 3: blocks are read as the diff needs them) or
        the tree a format-2 record holds (digests memoised on its nodes)."""
        loop = asyncio.get_running_loop()
        if e["state"] != "ready":
            raise Conflict(f"snapshot {e['name']} is {e['state']}, not ready")
        cached = self.trees.get(e["id"])
        if cached is not None:
            root: ns.Node = cached
            version_of: merkle.VersionOf = self._live_version
        else:
            parsed, _blob, _src = await self.fetch_record(e)
            if isinstance(parsed, Manifest):
                return merkle.DirRef(parsed.root), self._live_version
            versions = dict(parsed.chunks)
            root, version_of = parsed.root, versions.__getitem__
        if not isinstance(root, ns.Dir):
            raise InvalidArgument(f"snapshot {e['name']} is of a file; diff compares directories")
        dg = await loop.run_in_executor(None, merkle.digest, root, version_of)
        return merkle.DirRef(dg, root), version_of

    async def diff(self, ref: str, to: str | None) -> dict[str, Any]:
        """The changes from snapshot ``ref`` to snapshot ``to`` (or to the live tree at ``ref``'s
        path): only directories whose digests differ are read (blocks in batches, per level)."""
        t0 = time.perf_counter()
        st = self.m.state
        loop = asyncio.get_running_loop()
        a = st.snapshot_by_ref(ref)
        b = st.snapshot_by_ref(to) if to is not None else None
        ref_a, va = await self.tree_ref(a)
        if b is not None:
            ref_b, vb = await self.tree_ref(b)
        else:
            node = ns.must_get(st.root, paths.split(a["path"]))
            if not isinstance(node, ns.Dir):
                raise InvalidArgument(f"{a['path']} is not a directory now")
            vb = self._live_version
            ref_b = merkle.DirRef(await loop.run_in_executor(None, merkle.digest, node, vb), node)
        sides = ((a, va), (b or a, vb))
        steps = snapdiff.diff_steps(ref_a, ref_b)
        try:
            refs = next(steps)
            while True:
                want: dict[int, list[bytes]] = {0: [], 1: []}
                for side, r in refs:
                    if r.node is None:
                        want[side].append(r.digest)
                got = [await self.fetch_blocks(sides[k][0], want[k]) if want[k] else {} for k in (0, 1)]
                blocks = [merkle.block_of(r.node, sides[side][1]) if r.node is not None
                          else merkle.decode_block(got[side][r.digest], r.digest) for side, r in refs]
                refs = steps.send(blocks)
        except StopIteration as stop:
            changes: list[snapdiff.Change] = stop.value
        return {"from": a["name"], "to": b["name"] if b is not None else "", "path": a["path"],
                "to_path": b["path"] if b is not None else a["path"],
                "changes": [c.to_json() for c in changes], "summary": snapdiff.summarize(changes).to_json(),
                "seconds": round(time.perf_counter() - t0, 6)}

    def remember_tree(self, path: str, sid: str, node: ns.Dir) -> list[ns.Dir]:
        """Keep ``node`` as ``path``'s newest snapshot tree; returns the trees let go (the nodes
        only they held are freed when the caller drops the list: ~0.6 ms after 100 changed
        files, which a build does after its answer)."""
        self.latest[path] = (sid, node)
        self.trees[sid] = node
        gone = [i for i in self.trees if i not in self.m.state.snapshots] + self._trees_of(path)[:-KEEP_TREES]
        return [self.trees.pop(i) for i in dict.fromkeys(gone)]

    def make_room(self, path: str) -> list[ns.Dir]:
        """The trees of ``path``'s snapshots but the newest KEEP_TREES - 1, taken out (a build of
        its next snapshot does it while the holders work, so that its commit's remember_tree
        lets none go on the way to its answer, nor right after it in front of the next request);
        the caller drops them."""
        mine = self._trees_of(path)
        return [self.trees.pop(i) for i in mine[:max(0, len(mine) - (KEEP_TREES - 1))]]

    def _trees_of(self, path: str) -> list[str]:
        """The ids of the snapshot trees kept for ``path``, oldest first."""
        return [i for i in self.trees if (e := self.m.state.snapshots.get(i)) is not None and e["path"] == path]

    def previous_of(self, e: ops.SnapshotEntry) -> tuple[str, ns.Dir] | None:
        """The newest snapshot tree of ``e``'s path this master built, if still in the catalog."""
        prev = self.latest.get(e["path"])
        if prev is None or prev[0] == e["id"]:
            return None
        pe = self.m.state.snapshots.get(prev[0])
        return prev if pe is not None and pe["state"] == "ready" else None

    async def since_previous(self, entry: ops.SnapshotEntry, node: ns.Node) -> tuple[str, dict[str, Any]]:
        """The pinned tree's root digest (hex) and what changed since the previous snapshot of
        the same path (counts of the diff report; empty when that tree is not in memory)."""
        if not isinstance(node, ns.Dir):
            return "", {}
        loop = asyncio.get_running_loop()
        version_of = self.m.state.version.__getitem__  # the pin protects every chunk it reaches
        dg = node.digest
        if dg is None:
            dg = await loop.run_in_executor(None, merkle.digest, node, version_of)
        prev = self.previous_of(entry)
        if prev is None:
            return dg.hex(), {}
        pe = self.m.state.snapshots[prev[0]]
        pa = merkle.DirRef(merkle.digest(prev[1], self._live_version), prev[1])
        changes = [] if pa.digest == dg else await loop.run_in_executor(
            None, diff_nodes, pa, self._live_version, merkle.DirRef(dg, node), version_of)
        return dg.hex(), {"since": pe["name"], "since_id": pe["id"], **snapdiff.summarize(changes).to_json()}

    async def delete(self, ref: str) -> dict[str, Any]:
        e = self.m.state.snapshot_by_ref(ref)
        if e["state"] == "pending":
            raise Conflict(f"snapshot {e['name']} is still being taken; delete it when it is ready")
        await self.m.mutate({"op": "snap_delete", "id": e["id"]})
        self.trees.pop(e["id"], None)
        if self.latest.get(e["path"], ("",))[0] == e["id"]:
            del self.latest[e["path"]]
        for h in e.get("holders", []):  # the copies go with the holders' next heartbeats
            if h["id"] in self.m.chunkmap.cs:
                self.m.outbox.order(h["id"], "record", e["id"])
        return {"deleted": e["name"], "id": e["id"]}

    async def fetch_record(self, e: ops.SnapshotEntry) -> tuple[ParsedRecord | Manifest, bytes, dict[str, Any]]:
        """The record (format 2: the whole tree; format 3: the root digest) from the nearest
        healthy holder; fall back on error or bad checksum."""
        holders = []
        for h in e.get("holders", []):
            cs = self.m.chunkmap.cs.get(h["id"])
            if cs and cs.alive:
                holders.append(cs)
        ranked = find_nearest(self.m.location, [c.candidate() for c in holders])
        errors = []
        bad = 0
        assert self.m._session is not None
        loop = asyncio.get_running_loop()
        for r in ranked:
            cs = self.m.chunkmap.cs[r.candidate.id]
            try:
                async with self.m._session.get(f"{cs.address}/internal/records/{e['id']}") as resp:
                    if resp.status != 200:
                        raise from_json(resp.status, await resp.json(content_type=None))
                    data = await resp.read()
                parsed = await loop.run_in_executor(None, parse_any, data, e["sha256"])
                return parsed, data, {"id": cs.id, "address": cs.address, **cs.location.to_json()}
            except (NotFound, CorruptData, ValueError) as exc:  # the copy itself is bad: heal the catalog
                errors.append(f"{cs.id}: {exc}")
                bad += 1
                why = "missing" if isinstance(exc, NotFound) else "not the catalog's bytes"
                await self.drop_record_copy(e["id"], cs.id, why)
                if why != "missing":
                    self.m.outbox.order(cs.id, "record", e["id"])
            except PEER_ERRORS as exc:
                log.warning("snapshot %s: copy on %s unusable: %s", e["id"], cs.id, exc)
                errors.append(f"{cs.id}: {exc}")
        if (ranked and bad == len(ranked)) or (not e.get("holders") and self._bad_record_copies.get(e["id"])):
            raise Unavailable(f"every record copy of snapshot {e['name']} is missing or damaged"
                              + (": " + "; ".join(errors) if errors else ""))
        raise Unavailable(f"no usable copy of snapshot {e['name']}: " + ("; ".join(errors) or "no live holder"))

    async def restore(self, ref: str, rid: str, to: str | None) -> dict[str, Any]:
        """Restore snapshot ``ref`` in place (``to`` None) or to the new path ``to``; ``rid``
        names the request so a retry answers with the first result instead of restoring again.
        The cyclic collector is paused throughout (see :class:`QuietGC`; as in :meth:`build`, once
        a pass digesting snapshotted trees ahead ends)."""
        await self.warmed()
        with self.quiet_gc():
            return await self._restore(ref, rid, to)

    async def _restore(self, ref: str, rid: str, to: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if rid and rid in self.m.state.restores:
            return self.repeated_restore(rid, ref, to)
        e = self.m.state.snapshot_by_ref(ref)
        if e["state"] != "ready":
            raise Conflict(f"snapshot {e['name']} is {e['state']}, not ready")
        if to is not None:
            parts = paths.split(to)
            mode = "new"
        else:
            parts = paths.split(e["path"])
            mode = "inplace"
        self.check_target(parts, mode)
        parsed, blob, source = await self.fetch_record(e)
        t_record = time.perf_counter()
        st = self.m.state
        if isinstance(parsed, Manifest):
            op = await self._plan_restore(e, parsed, parts, mode)
        else:
            self.check_target(parts, mode)  # re-check: the namespace may have moved on meanwhile
            missing = [h for h, _v in parsed.chunks if h not in st.version]
            if missing:
                raise CorruptData(f"snapshot references {len(missing)} chunks the master no longer has")
            op = {"blob": blob, "_parsed": parsed}
        if mode == "inplace":
            self.m.leases.check_none_below(paths.join(parts))
        if rid and rid in self.m.state.restores:  # a concurrent twin finished first
            return self.repeated_restore(rid, ref, to)
        summary = {"snapshot": e["name"], "snapshot_id": e["id"], "path": paths.join(parts), "mode": mode,
                   "source": source, "duration_seconds": round(time.perf_counter() - t0, 6),
                   "blocks_fetched": op.pop("_fetched", 0), "blocks_used": op.pop("_used", 0),
                   "edits": len(op.get("edits", ()))}
        # ``op`` adds the format's keys (and the in-memory hints) to the common ones
        t_planned = time.perf_counter()
        result = await self.m.mutate(cast(ops.Restore, {
            "op": "restore", "id": e["id"], "path": paths.join(parts), "mode": mode,
            "mtime": now_ns(), "rid": rid, "summary": summary, **op}))
        log.info("snapshot %s restored %s to %s in %.3fs (record %.3fs, planned %.3fs with %d blocks fetched, "
                 "applied %.3fs)", e["name"], mode, paths.join(parts), time.perf_counter() - t0, t_record - t0,
                 t_planned - t_record, summary["blocks_fetched"], time.perf_counter() - t_planned)
        return {**summary, **result}

    async def _plan_restore(self, e: ops.SnapshotEntry, man: Manifest, parts: tuple[str, ...],
                            mode: str) -> dict[str, Any]:
        """The format-3 restore op: fetch only the blocks whose directories differ from the live
        ones at the same place (level by level, in batches, each verified), then assemble the
        tree against the state as it is now. The caller applies it with no await in between, so
        the op's blocks are exactly what its apply (and any replay) needs."""
        st = self.m.state
        loop = asyncio.get_running_loop()
        have: dict[bytes, bytes] = {}
        memo = merkle.Decoded()
        # a snapshot this master built lately is still in memory: its blocks come from there
        # (each verified against its digest as any fetched block is), without a round trip
        cached = self.trees.get(e["id"])
        if mode == "inplace" and cached is not None and cached.digest == man.root:
            edits = await self._edits(e, parts, cached)
            if edits is not None:
                return edits
        local = merkle.TreeBlocks(cached, self._live_version) if cached is not None and cached.digest == man.root \
            else None
        fetched = 0
        while True:
            self.check_target(parts, mode)
            reused: list[tuple[tuple[str, ...], ns.Dir]] = []
            try:  # the O(changed) (to a new path: O(files)) assembly runs in a worker thread
                tree, used, handles = await loop.run_in_executor(
                    None, _assemble_job, man.root, have, st.restore_candidates(parts, mode, e["path"]),
                    st.version_or_zero, reused, memo, local)
            except merkle.NeedBlocks as need:  # what the tree in memory (if any) could not give
                have.update(await self.fetch_blocks(e, need.digests))
                fetched += len(need.digests)
                continue
            # back on the loop, with no await until the op is applied: every live directory it
            # reused is still where it was, so the apply (and any replay) assembles the same tree
            self.check_target(parts, mode)
            roots = [r for r in st.restore_candidates(parts, mode, e["path"]) if isinstance(r, ns.Dir)]
            if all(any(ns.get(r, rel) is node for r in roots) for rel, node in reused):
                break
        missing = sum(1 for h in handles if h not in st.version)
        if missing:
            raise CorruptData(f"snapshot references {missing} chunks the master no longer has")
        return {"format": 3, "root": man.root.hex(), "source_path": e["path"],
                "blocks": merkle.pack_frames([(dg, have[dg]) for dg in used]),
                "counts": {"files": e["files"], "dirs": e["dirs"], "chunks": e["chunks"]},
                "_tree": tree, "_fetched": fetched, "_used": len(used)}

    async def _edits(self, e: ops.SnapshotEntry, parts: tuple[str, ...], snap: ns.Dir) -> dict[str, Any] | None:
        """The format-4 op of an in-place restore whose snapshot tree is in memory: the edits
        that turn the live tree into it, found where the two differ (after a few changes, a
        walk down their paths: no digest of the live tree, no block; in a worker thread, and
        again if the live tree moved meanwhile). Its apply swaps in the snapshot's own tree (the
        same content); a replay makes the edits. None when the edits would carry whole subtrees
        (a directory the live tree lacks) or are too many: restore from blocks. The caller
        applies it with no await in between."""
        while True:
            self.check_target(parts, "inplace")
            live = ns.get(self.m.state.root, parts)
            if not isinstance(live, ns.Dir):
                return None
            edits = await asyncio.get_running_loop().run_in_executor(None, ns.edits_to, live, snap)
            if edits is None:
                return None
            self.check_target(parts, "inplace")
            if ns.get(self.m.state.root, parts) is live:
                break
        version = self.m.state.version
        missing = sum(1 for ed in edits if ed[0] == "f" for h in cast(list[int], ed[5]) if h not in version)
        if missing:
            raise CorruptData(f"snapshot references {missing} chunks the master no longer has")
        return {"format": 4, "edits": edits, "counts": {"files": e["files"], "dirs": e["dirs"], "chunks": e["chunks"]},
                "_tree": snap, "_fetched": 0, "_used": 0}

    def repeated_restore(self, rid: str, ref: str, to: str | None) -> dict[str, Any]:
        """The stored result of restore ``rid``, if this request asks for the same thing."""
        done = self.m.state.restores[rid]
        same = ref in (done.get("snapshot"), done.get("snapshot_id")) and (
            done.get("mode") == "inplace" if to is None else (done.get("mode") == "new" and done.get("path") == to))
        if not same:
            raise Conflict(f"restore id {rid} was already used to restore {done.get('snapshot')} to {done.get('path')}")
        return {**done, "repeated": True}

    def check_target(self, parts: tuple[str, ...], mode: str) -> None:
        st = self.m.state
        if not parts:
            if mode == "new":
                raise InvalidArgument("cannot restore to /")
            return
        ns.must_dir(st.root, parts[:-1])
        if mode == "new" and ns.get(st.root, parts) is not None:
            raise AlreadyExists(f"restore target {paths.join(parts)} already exists")

    async def check_record_copies(self, cs: ChunkserverInfo, digests: dict[str, Any],
                                  only: set[str] | None = None) -> set[str]:
        """Compare the records a holder reports with the catalog: a copy missing from two
        heartbeats in a row (one may predate a copy just shipped), of the wrong size or with
        another sha256 is dropped and re-made elsewhere. ``only``: the ids a report of changes
        named (recordreport.py), with those found missing before; None: every copy it holds.
        Returns the ids whose bad copy to delete."""
        bad: set[str] = set()
        if only is None:
            held = list(self.m.state.held_by(cs.id))
        else:
            snaps = self.m.state.snapshots
            ids = only | {sid for (cid, sid) in self._record_missing if cid == cs.id}
            for i in ids - snaps.keys():  # (deleted meanwhile)
                self._record_missing.pop((cs.id, i), None)
            held = [snaps[i] for i in sorted(ids) if i in snaps]
        for e in held:
            if e["state"] != "ready" or all(h["id"] != cs.id for h in e["holders"]):
                continue  # (its holders changed while an earlier one was dropped)
            key = (cs.id, e["id"])
            if e["id"] not in cs.records:
                self._record_missing[key] = self._record_missing.get(key, 0) + 1
                if self._record_missing[key] >= 2:
                    await self.drop_record_copy(e["id"], cs.id, "missing")
                continue
            self._record_missing.pop(key, None)
            d = digests.get(e["id"])
            if not (isinstance(d, list) and len(d) == 2):
                continue
            if d[0] != e["record_bytes"]:
                why = "truncated" if isinstance(d[0], int) and d[0] < e["record_bytes"] else "wrong size"
            elif d[1] and d[1] != e["sha256"]:
                why = "not the catalog's bytes"
            else:
                continue
            await self.drop_record_copy(e["id"], cs.id, why)
            bad.add(e["id"])
        return bad

    async def drop_record_copy(self, sid: str, cid: str, why: str) -> None:
        """Take ``cid`` out of snapshot ``sid``'s holders (logged); record repair re-makes the copy."""
        e = self.m.state.snapshots.get(sid)
        if e is None or all(h["id"] != cid for h in e["holders"]):
            return
        log.error("snapshot %s: the record copy on %s is %s; dropped, re-copying from a good one",
                  e["name"], cid, why)
        M.M_RECORD_DROPPED.labels(why).inc()
        self._record_missing.pop((cid, sid), None)
        self._bad_record_copies.setdefault(sid, set()).add(cid)
        self.m.chunkmap.dirty = True
        await self.m.mutate({"op": "snap_holders", "id": sid,
                           "holders": [h for h in e["holders"] if h["id"] != cid]})

    async def repair_records(self) -> int:
        """Bring every ready snapshot back to its number of record copies (e.g. after a holder
        died, lost its disk or reported its copy corrupt), each new copy in a new zone if any."""
        made = 0
        for e in list(self.m.state.snapshots.values()):
            if e["state"] != "ready":
                continue
            live = [h for h in e["holders"] if h["id"] in self.m.chunkmap.cs and self.m.chunkmap.cs[h["id"]].alive]
            if len(live) >= e["copies"] or not live:
                if not live and e["holders"]:
                    log.error("snapshot %s has no live record copy", e["name"])
                continue
            held = {h["id"] for h in e["holders"]}
            zones = {(h.get("region", ""), h.get("zone", "")) for h in live}
            options = [(cs, why) for cs, why in self.rank_holders({**e, "targets": []})
                       if cs.id not in held and not self.m.outbox.pending(cs.id, "record", e["id"])]
            rotted = self._bad_record_copies.get(e["id"], set())
            # prefer a new zone, and a disk that did not just corrupt this record
            options.sort(key=lambda o: (o[0].id in rotted, (o[0].location.region, o[0].location.zone) in zones))
            if not options:
                self.m.chunkmap.dirty = True
                continue
            target, why = options[0]
            try:
                parsed, data, _src = await self.fetch_record(e)
                if isinstance(parsed, Manifest):  # the blocks first: a record is whole or absent
                    await self.copy_closure(e, parsed.root, target)
                await self.m.call_cs(target, "PUT", f"/internal/records/{e['id']}", data=data,
                                   headers={"X-Kubegfs-Sha256": e["sha256"]})
            except PEER_ERRORS as exc:
                M.M_RECORD_REPAIRS.labels("failed").inc()
                log.warning("re-copying snapshot %s to %s failed: %s", e["name"], target.id, exc)
                self.m.chunkmap.dirty = True
                continue
            self.m.outbox.cancel(target.id, "record", e["id"])
            cur = self.m.state.snapshots.get(e["id"])
            if cur is None:
                continue
            holder = {"id": target.id, "address": target.address, **target.location.to_json(), "reason": why}
            await self.m.mutate({"op": "snap_holders", "id": e["id"], "holders": cur["holders"] + [holder]})
            target.records.add(e["id"])
            M.M_RECORD_REPAIRS.labels("success").inc()
            log.info("snapshot %s: record re-copied to %s (%s)", e["name"], target.id, target.location.zone)
            made += 1
        return made
