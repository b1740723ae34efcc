"""The write path (HDFS's FSDirWriteFileOp): open a file for writing under a lease, place new
chunks, commit the chunk list, and the chunk version bumps that keep replicas honest.

GFS's order: a new version is given to the replicas of a chunk about to be appended to in place
(or the chunk is cloned first if a snapshot shares it) before the client writes, so a replica
that misses the append is detectably stale; at commit, replicas that did not acknowledge every
piece are retired by another bump. Validation is pure (``MasterState.prepare_open``,
``validate_commit``, ``prepare_commit``); this module adds the leases and the chunkserver calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import metrics as M
from .. import namespace as ns
from ..errors import Conflict, InvalidArgument, Unavailable
from ..topology import Location, find_nearest, place_replicas
from ..web import CHAIN_HEADER, PEER_ERRORS, hexh
from ..wire import SMALL_FILE
from . import ops
from .chunkmap import ChunkserverInfo
from .leases import Lease

if TYPE_CHECKING:
    from .server import Master

log = logging.getLogger("kubegfs.master")


class WritePath:
    def __init__(self, m: Master) -> None:
        self.m = m

    def cs_json(self, ids: list[str]) -> list[dict[str, Any]]:
        cs = self.m.chunkmap.cs
        return [{"id": i, "address": cs[i].address} for i in ids if i in cs]

    async def open(self, path: str, mode: str, file_mode: int, alloc: bool = False,
                   near: Location | None = None) -> dict[str, Any]:
        """A write lease on ``path``. With ``alloc``, the first new chunk is placed in the same
        call (``first``; not for an append to a partial last chunk, which gets ``last``), so a
        small file is written with two calls to the master: open and commit."""
        st = self.m.state
        path, parts, node = st.prepare_open(path, mode, file_mode)
        lease = self.m.leases.grant(path, mode, file_mode, node)
        out: dict[str, Any] = {"lease": lease.id, "chunk_size": st.chunk_size, "size": 0}
        try:
            if mode == "append":
                assert isinstance(node, ns.File)
                out["size"] = node.size
                if node.size % st.chunk_size and node.chunks:
                    out["last"] = await self.prepare_inplace(lease, parts, node)
            if alloc and "last" not in out:
                out["first"] = self.alloc(lease.id, near)
        except BaseException:
            self.m.leases.drop(lease.id)
            raise
        return out

    async def create_empty(self, path: str, mode: str, file_mode: int) -> dict[str, Any]:
        """An empty file (``mode`` create or overwrite) in one call: the same lease, checks and
        commit op as an open followed by a commit of no chunks, answered once the op is durable."""
        out = await self.open(path, mode, file_mode)
        try:
            return await self.commit(out["lease"], 0, [], {})
        finally:
            self.m.leases.drop(out["lease"])  # a no-op once the commit dropped it

    async def create_small(self, path: str, mode: str, file_mode: int, data: bytes) -> dict[str, Any]:
        """A small file (at most SMALL_FILE bytes) in one call from the client: the master
        places its chunk, sends the bytes down the replica chain itself (each replica
        fdatasyncs before it answers, as for a client's last piece) and commits the replicas
        that stored them, answering once the commit op is durable. The bytes pass through the
        master only because they are this few; anything larger is written by the client."""
        if not data:
            return await self.create_empty(path, mode, file_mode)
        if len(data) > min(SMALL_FILE, self.m.state.chunk_size):
            raise InvalidArgument(f"data in a create is at most {SMALL_FILE} bytes; write larger files with open")
        out = await self.open(path, mode, file_mode, alloc=True, near=self.m.location)
        lid = out["lease"]
        try:
            first = out["first"]
            h = int(first["handle"], 16)
            acked = await self._store_chain(first["handle"], [r["address"] for r in first["replicas"]],
                                            {r["address"]: r["id"] for r in first["replicas"]}, data)
            return await self.commit(lid, len(data), [h], {h: acked})
        finally:
            self.m.leases.drop(lid)  # a no-op once the commit dropped it

    async def _store_chain(self, handle: str, chain: list[str], ids: dict[str, str], data: bytes) -> list[str]:
        """The ids of the replicas that stored and synced ``data`` as a new chunk's only piece:
        sent to the head of the chain, which forwards it; if the head fails, to the rest."""
        errors: list[str] = []
        while chain:
            head, rest = chain[0], chain[1:]
            try:
                reply = await self.m.call_url("PUT", f"{head}/internal/chunks/{handle}", data=data,
                                              params={"offset": "0", "version": "1", "sync": "1"},
                                              headers={CHAIN_HEADER: ",".join(rest)})
                return [str(i) for i in reply.get("acked", [])]
            except PEER_ERRORS as exc:
                errors.append(f"{ids.get(head, head)}: {exc}")
                chain = rest
        raise Unavailable(f"no replica accepted chunk {handle}: " + "; ".join(errors))

    async def prepare_inplace(self, lease: Lease, parts: tuple[str, ...], node: ns.File) -> dict[str, Any]:
        """The last, partial chunk will be appended to: clone it first if it is shared (COW),
        else bump its version so replicas that miss the write are detectably stale."""
        st = self.m.state
        cmap = self.m.chunkmap
        last = node.chunks[-1]
        reps = cmap.replicas_of(last)
        if not reps:
            raise Unavailable(f"no live replica of chunk {hexh(last)}")

        def unchanged() -> None:  # between the chunkservers' answers and the log
            if ns.get(st.root, parts) is not node:
                raise Conflict("the file changed while preparing the append; retry")

        if st.is_shared(last):
            new = st.new_handle()
            lease.inplace = new  # from here on re-replication leaves the chunk alone
            version = st.version[last]
            results = await asyncio.gather(
                *(self.m.call_cs(c, "POST", f"/internal/chunks/{hexh(last)}/clone",
                                 json={"dst": hexh(new), "version": version}) for c in reps),
                return_exceptions=True,
            )
            ok = [c.id for c, r in zip(reps, results, strict=True) if not isinstance(r, BaseException)]
            if not ok:
                raise Unavailable(f"no replica could clone chunk {hexh(last)}: {results[0]}")
            unchanged()
            await self.m.mutate(ops.Cow(op="cow", path=lease.path, index=len(node.chunks) - 1,
                                        old=last, new=new))
            M.M_COW.inc()
            cmap.locations[new] = set(ok)
            target, tv = new, version
        else:
            lease.inplace = last  # from here on re-replication leaves the chunk alone
            # GFS: a new version at lease grant, so a replica that misses the append is stale
            tv = await self.bump_version(last, reps, unchanged, path=lease.path)
            target = last
        cur = ns.get(st.root, parts)
        assert isinstance(cur, ns.File)
        lease.node = cur
        lease.base = cur.chunks
        lease.inplace = target
        return {"handle": hexh(target), "version": tv, "offset": node.size % st.chunk_size,
                "replicas": self.cs_json(sorted(c.id for c in cmap.replicas_of(target)))}

    def alloc(self, lid: str, near: Location | None = None) -> dict[str, Any]:
        """Place a new chunk. The replicas come nearest to ``near`` (the writer) first: the
        client sends each piece to the first, which forwards it down the list."""
        lease = self.m.leases.renew(lid)
        alive = [c.candidate() for c in self.m.chunkmap.alive()]
        chosen = place_replicas(alive, self.m.state.replication, need_bytes=0)
        if not chosen:
            raise Unavailable("no live chunkserver to place a chunk on")
        if near is not None:
            chosen = [r.candidate for r in find_nearest(near, chosen)]
        h = self.m.state.new_handle()
        lease.allocated[h] = [c.id for c in chosen]
        return {"handle": hexh(h), "version": 1, "replicas": self.cs_json(lease.allocated[h])}

    async def commit(self, lid: str, size: int, handles: list[int], acked: dict[int, list[str]]) -> dict[str, Any]:
        lease = self.m.leases.renew(lid)
        st = self.m.state
        cmap = self.m.chunkmap
        new = st.validate_commit(size, handles, acked, lease.base, lease.allocated, lease.node,
                                 lease.mode == "append")
        if lease.inplace is not None and acked.get(lease.inplace):
            await self.retire_missed_replicas(lease.inplace, set(acked[lease.inplace]), lease.path)
        try:
            op = st.prepare_commit(lease.path, size, handles, new, lease.file_mode, lease.node, lease.inplace)
        except Conflict:
            self.m.leases.drop(lease.id)
            raise
        self.m.leases.drop(lease.id, committed=frozenset(new))
        await self.m.mutate(op)
        for h in new:
            cmap.locations[h] = {i for i in acked[h] if i in cmap.cs}
            for i in cmap.locations[h]:
                cmap.cs[i].chunks[h] = 1
            for i in set(lease.allocated[h]) - cmap.locations[h]:
                if i in cmap.cs:  # took some pieces, not all: its copy is short, never a replica
                    cmap.cs[i].stale.add(h)
            if len(cmap.locations[h]) < st.replication:
                cmap.dirty = True
        return {"path": lease.path, "size": size, "chunks": len(handles)}

    async def retire_missed_replicas(self, h: int, acked: set[str], path: str = "") -> None:
        """Replicas of an appended-to chunk that did not acknowledge every piece carry the
        lease's version but not its bytes: bump the version on the ones that did, so the others
        are detectably stale, and have them deleted."""
        cmap = self.m.chunkmap
        missed = cmap.locations.get(h, set()) - acked
        if not missed:
            return
        good = [c for c in cmap.replicas_of(h) if c.id in acked]
        if not good:
            raise Unavailable(f"no replica of chunk {hexh(h)} holds the whole append")
        await self.bump_version(h, good, path=path)
        log.warning("chunk %s: %d replica(s) missed part of an append; they will be replaced", hexh(h), len(missed))

    async def bump_version(self, h: int, reps: list[ChunkserverInfo], check: Callable[[], None] | None = None,
                           path: str = "") -> int:
        """Give ``reps`` the chunk's next version, then log it (``check`` may still refuse in
        between). The holders that did not take it drop out of its locations and are told to
        delete their copy (through the deletion gate, once the bump is durable); re-replication
        makes good ones. Returns the new version."""
        cmap = self.m.chunkmap
        tv = self.m.state.version[h] + 1
        results = await asyncio.gather(
            *(self.m.call_cs(c, "POST", f"/internal/chunks/{hexh(h)}/version", json={"version": tv}) for c in reps),
            return_exceptions=True,
        )
        fresh = {c.id for c, r in zip(reps, results, strict=True) if not isinstance(r, BaseException)}
        if not fresh:
            raise Unavailable(f"no replica of chunk {hexh(h)} accepted the new version: {results[0]}")
        if check is not None:
            check()
        bump = ops.Bump(op="bump", h=h, v=tv)
        if path:
            bump["path"] = path
        await self.m.mutate(bump)
        for cid in cmap.locations.get(h, set()) - fresh:
            if cid in cmap.cs:
                cmap.cs[cid].stale.add(h)
                cmap.dirty = True
        cmap.locations[h] = fresh
        for cid in fresh:
            cmap.cs[cid].chunks[h] = tv
        return tv
