"""Where chunks are (HDFS's HeartbeatManager + BlocksMap, SeaweedFS's topology): the chunkserver
registry, each chunk's live replicas, liveness, and reconciling a heartbeat's chunk report with
the chunk table.

All of it is soft state, rebuilt from heartbeats after a master restart (GFS §2.6.2): a full
report on registration, then increments. ``reconcile`` decides which reported copies are not
replicas (unknown or garbage handles, older versions, short or corrupt copies, a copy taken as an
append began) and returns them for deletion; the caller sends those through the deletion gate
(``outbox.py``), never straight to the chunkserver. ``dirty`` tells re-replication there may be
work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import metrics as M
from ..errors import InvalidArgument
from ..recordreport import RecordView
from ..topology import Candidate, Location
from ..web import handle_hex, hexh
from .leases import LeaseTable
from .state import MasterState

log = logging.getLogger("kubegfs.master")

SMALL_TABLE = 200_000  # chunk tables up to this size are scanned on demand for status/metrics
Scan = tuple[int, int, list[int]]  # under-replicated, lost, the repairable chunks to copy first
SCAN_SLICE = 50_000  # chunks a re-replication pass checks between turns of the event loop (~10 ms)


@dataclass
class ChunkserverInfo:
    id: str
    address: str
    location: Location
    capacity: int = 0
    used: int = 0
    free: int = 0
    last_seen: float = 0.0
    alive: bool = True
    chunks: dict[int, int] = field(default_factory=dict)  # handle -> version it reported
    records: set[str] = field(default_factory=set)
    record_view: RecordView = field(default_factory=RecordView)  # its records as its heartbeats report them
    registered: bool = False
    stale: set[int] = field(default_factory=set)  # copies to delete with the next heartbeat reply
    # chunk deletes sent in the last heartbeat reply: the chunkserver carries them out before it
    # sends its next heartbeat, so until then it is no target for a new copy of those chunks
    deleting: set[int] = field(default_factory=set)

    def candidate(self) -> Candidate:
        return Candidate(self.id, self.location, self.used, self.capacity, self.address)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "address": self.address, "location": self.location.to_json(),
            "capacity_bytes": self.capacity, "used_bytes": self.used, "free_bytes": self.free,
            "alive": self.alive, "chunks": len(self.chunks), "records": sorted(self.records),
            "last_seen_seconds_ago": round(time.monotonic() - self.last_seen, 3),
        }


class ChunkMap:
    def __init__(self, state: MasterState, leases: LeaseTable,
                 on_dead: Callable[[ChunkserverInfo], None] | None = None) -> None:
        self.state = state
        self.leases = leases
        self.on_dead = on_dead or (lambda _cs: None)
        self.cs: dict[str, ChunkserverInfo] = {}
        self.locations: dict[int, set[str]] = {}  # handle -> ids of chunkservers holding a good replica
        self.dirty = True  # re-replication may have work
        self._lost_reported: set[int] = set()
        self._under_count = 0

    # ------------------------------------------------------------------ queries

    def alive(self) -> list[ChunkserverInfo]:
        return [c for c in self.cs.values() if c.alive and c.registered]

    def replicas_of(self, h: int) -> list[ChunkserverInfo]:
        return [self.cs[i] for i in self.locations.get(h, ()) if i in self.cs and self.cs[i].alive]

    def holding(self, h: int) -> set[str]:
        """Chunkservers with any copy of ``h``, replica or not."""
        return {c for c in self.cs if h in self.cs[c].chunks}

    def deleting(self, h: int) -> set[str]:
        """Chunkservers told to delete their copy of ``h`` that have not sent a heartbeat since."""
        return {c for c, info in self.cs.items() if h in info.deleting}

    # ------------------------------------------------------------------ liveness

    def mark_dead(self, cs: ChunkserverInfo) -> None:
        cs.alive = False
        cs.registered = False
        self.on_dead(cs)
        for h in cs.chunks:
            self.locations.get(h, set()).discard(cs.id)
        self.dirty = True

    def expire(self, dead_after: float, now: float | None = None) -> list[ChunkserverInfo]:
        """Mark dead every registered chunkserver silent for more than ``dead_after`` seconds."""
        now = time.monotonic() if now is None else now
        dead = [c for c in self.cs.values() if c.alive and c.registered and now - c.last_seen > dead_after]
        for cs in dead:
            log.warning("chunkserver %s missed heartbeats for %.1fs: marked dead", cs.id, now - cs.last_seen)
            self.mark_dead(cs)
        return dead

    # ------------------------------------------------------------------ heartbeats

    def heard_from(self, cid: str, address: str, loc: Location, full: bool) -> ChunkserverInfo | None:
        """The chunkserver behind a heartbeat, or None if it must register (send a full report) first."""
        cs = self.cs.get(cid)
        if not full and (cs is None or not cs.registered):
            return None
        if cs is None:
            cs = self.cs[cid] = ChunkserverInfo(cid, address, loc)
        cs.address, cs.location = address, loc
        cs.last_seen = time.monotonic()
        if not cs.alive or not cs.registered:
            log.info("chunkserver %s at %s registered (node=%s zone=%s region=%s)", cid, address,
                     loc.node, loc.zone, loc.region)
        cs.alive = True
        return cs

    def reconcile(self, cs: ChunkserverInfo, body: dict[str, Any], full: bool) -> set[int]:
        """Fold a heartbeat's chunk report into the map; returns the copies on ``cs`` to delete."""
        st = self.state
        cid = cs.id
        delete: set[int] = set()

        def take(items: Any) -> None:
            if not isinstance(items, list):
                raise InvalidArgument("chunk lists must be [[handle, version], ...]")
            for it in items:
                if not (isinstance(it, list) and len(it) == 2 and isinstance(it[1], int)):
                    raise InvalidArgument("chunk lists must be [[handle, version], ...]")
                h = handle_hex(it[0])
                v = it[1]
                cs.chunks[h] = v
                want = st.version.get(h)
                if want is None:
                    if not self.leases.allocated(h):
                        delete.add(h)
                    continue
                if v < want or h in cs.stale:
                    delete.add(h)  # stale replica: missed a mutation
                    self.locations.get(h, set()).discard(cid)
                    self.dirty = True
                    continue
                if cid not in self.locations.get(h, ()) and self.leases.being_written(h):
                    delete.add(h)  # a copy made just as an append began: it will miss the append
                    continue
                self.locations.setdefault(h, set()).add(cid)

        if full:
            for other in self.cs.values():
                if other.id != cid and other.address == cs.address and other.alive:
                    # a new process (e.g. a fresh disk, new identity) took over this address
                    log.warning("chunkserver %s replaced %s at %s", cid, other.id, cs.address)
                    self.mark_dead(other)
            for h in list(cs.chunks):
                self.locations.get(h, set()).discard(cid)
            cs.chunks = {}
            take(body.get("chunks", []))
            cs.registered = True
            self.dirty = True
        else:
            take(body.get("added", []))
            for hs in body.get("removed", []) or []:
                h = handle_hex(hs)
                cs.chunks.pop(h, None)
                locs = self.locations.get(h)
                if locs is not None and cid in locs:
                    locs.discard(cid)
                    self.dirty = True  # a counted replica is gone: re-replication has work
        for hs in body.get("corrupt", []) or []:
            h = handle_hex(hs)
            M.M_CORRUPT.inc()
            log.error("chunkserver %s reports chunk %s corrupt; re-replicating from a good copy", cid, hs)
            self.locations.get(h, set()).discard(cid)
            delete.add(h)
            self.dirty = True
        for h in st.garbage & cs.chunks.keys():
            delete.add(h)
        for h in cs.stale:
            if cid not in self.locations.get(h, ()):
                delete.add(h)
        cs.stale.clear()
        for h in delete & st.garbage:
            if not any(h in c.chunks for c in self.cs.values() if c.id != cid):
                st.garbage.discard(h)
        for h in delete:
            cs.chunks.pop(h, None)  # ordered deleted: no longer counts as held
        return delete

    # ------------------------------------------------------------------ replication level

    def scan_replication(self, limit: int = 200) -> Scan:
        """One pass over the chunk table: (under-replicated, lost, up to ``limit`` repairable
        chunks, fewest replicas first). Lost chunks (no live replica) are reported once each and
        never crowd out the ones that can be repaired."""
        return next(out for out in self._scan(limit, sliced=False) if out is not None)

    async def scan_replication_sliced(self, limit: int = 200) -> Scan:
        """:meth:`scan_replication` over a copy of the handles, giving the event loop a turn
        every SCAN_SLICE chunks: 1M chunks in one go held it ~0.2 s, in front of every request.
        A chunk made meanwhile waits for the next pass (whoever made it short sets ``dirty``)."""
        for out in self._scan(limit, sliced=True):
            if out is not None:
                return out
            await asyncio.sleep(0)
        raise AssertionError("a scan ends with its result")

    def _scan(self, limit: int, sliced: bool) -> Iterator[Scan | None]:
        """The pass, with a None between slices (when ``sliced``), then its result."""
        st = self.state
        goal = st.replication
        under = lost = 0
        repairable: list[tuple[int, int]] = []
        newly_lost: list[int] = []
        locs = self.locations
        parts: Iterator[Iterable[int]] = iter((st.version,))
        if sliced:
            every = list(st.version)
            parts = (every[i:i + SCAN_SLICE] for i in range(0, len(every), SCAN_SLICE))
        for i, part in enumerate(parts):
            if i:
                yield None
            for h in part:
                n = len(locs.get(h, ()))
                if n >= goal or not (st.live.get(h) or st.snap.get(h)):
                    continue
                under += 1
                if n == 0:
                    lost += 1
                    if h not in self._lost_reported:
                        self._lost_reported.add(h)
                        newly_lost.append(h)
                elif len(repairable) < limit * 4:
                    repairable.append((n, h))
        if newly_lost:  # one line per scan, not one per chunk (a lost disk can mean millions)
            log.error("%d more chunks have no live replica left (%d in all), e.g. %s", len(newly_lost), lost,
                      ", ".join(hexh(h) for h in newly_lost[:5]))
        repairable.sort()
        self._under_count = under
        M.M_UNDER_REPLICATED.set(under)
        yield under, lost, [h for _n, h in repairable[:limit]]

    def under_replicated_count(self) -> int:
        """Exact for small tables; from the last re-replication scan for big ones (a scan of
        millions of chunks does not belong on every status call or metrics scrape)."""
        if len(self.state.version) <= SMALL_TABLE:
            return self.scan_replication(limit=0)[0]
        return self._under_count

    @property
    def last_under_count(self) -> int:
        return self._under_count
