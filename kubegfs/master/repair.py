"""Re-replication (GFS §4.3): bring every chunk back to its replication level from a live
replica, each new copy placed by the topology (a new zone first), never onto a server that still
holds an uncounted copy or has a delete of that chunk queued or sent and not yet carried out, and
never while an append writes the chunk in place (a copy taken then could miss acknowledged
bytes). A pass runs when the chunk map is ``dirty`` (a server died, a copy went bad or went away,
a write left a chunk short)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .. import metrics as M
from ..topology import place_replicas
from ..web import PEER_ERRORS, hexh

if TYPE_CHECKING:
    from .server import Master

log = logging.getLogger("kubegfs.master")


class Repair:
    def __init__(self, m: Master) -> None:
        self.m = m

    async def loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.m.chunkmap.dirty or self.m.guard.holds():  # safe mode: reports still coming
                continue
            try:
                await self.once()
            except Exception:  # noqa: BLE001
                log.exception("re-replication pass failed")

    async def once(self) -> int:
        """One pass: record copies first, then up to 200 under-replicated chunks, fewest replicas first."""
        m = self.m
        m.chunkmap.dirty = False
        await m.snapshots.repair_records()
        alive = [c.candidate() for c in m.chunkmap.alive()]
        _under, _lost, todo = await m.chunkmap.scan_replication_sliced(limit=200)
        sem = asyncio.Semaphore(8)
        done = 0

        async def one(h: int) -> None:
            nonlocal done
            srcs = m.chunkmap.replicas_of(h)
            if not srcs:
                return
            if m.leases.being_written(h):
                m.chunkmap.dirty = True  # copy it once the append has committed
                return
            version = m.state.version.get(h)
            if version is None:
                return
            need = m.state.replication - len(srcs)
            existing = [c.candidate() for c in srcs]
            holding = m.chunkmap.holding(h)
            counted = m.chunkmap.locations.get(h, set())
            for cid in holding - counted:
                if m.chunkmap.cs[cid].alive:
                    # a copy the master does not count (stale, short, or a lost delete order):
                    # delete it, or it would block this server as a target forever
                    m.chunkmap.cs[cid].stale.add(h)
                    m.chunkmap.dirty = True
            # not onto a server with a delete of this chunk queued, or sent and not yet carried
            # out: the delete could land after the copy and remove it
            pending = m.outbox.pending_on("chunk", h) | m.chunkmap.deleting(h)
            targets = place_replicas(alive, need, existing=existing, exclude=holding | pending)
            if len(targets) < need and pending - holding:
                m.chunkmap.dirty = True  # that server is a target again once its delete went out
            for t in targets:
                async with sem:
                    try:
                        await m.call_cs(m.chunkmap.cs[t.id], "POST", f"/internal/chunks/{hexh(h)}/replicate",
                                           json={"source": srcs[0].address, "version": version})
                    except PEER_ERRORS as exc:
                        M.M_REREPL.labels("failed").inc()
                        log.warning("re-replicating %s to %s failed: %s", hexh(h), t.id, exc)
                        m.chunkmap.dirty = True
                        continue
                    if m.state.version.get(h) != version or m.leases.being_written(h):
                        # an append began while we copied: the copy may miss its bytes
                        m.chunkmap.cs[t.id].stale.add(h)
                        M.M_REREPL.labels("raced").inc()
                        log.info("re-replication of %s to %s raced with an append; will retry", hexh(h), t.id)
                        m.chunkmap.dirty = True
                        continue
                    m.chunkmap.locations.setdefault(h, set()).add(t.id)
                    m.chunkmap.cs[t.id].chunks[h] = version
                    M.M_REREPL.labels("success").inc()
                    done += 1

        await asyncio.gather(*(one(h) for h in todo))
        if len(todo) >= 200:
            m.chunkmap.dirty = True
        return done
