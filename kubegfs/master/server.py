"""The master process: namespace + chunk table + snapshot catalog behind an aiohttp API.

Request → ``prepare`` (validate; nothing changes on error) → op stamped, applied and queued for
the op log → the answer waits until the op is durable (group commit), so nothing acknowledged
is ever lost. Snapshot records are built off the event loop from a pinned immutable view and
shipped to the nearest chunkservers, then committed to the catalog.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import Histogram

from .. import metrics as M
from .. import namespace as ns
from .. import paths
from ..errors import (
    AlreadyExists,
    Conflict,
    CorruptData,
    InvalidArgument,
    KubegfsError,
    NotFound,
    Unavailable,
    from_json,
)
from ..snapobj import ParsedRecord, build_record, build_record_in_child, parse_record
from ..topology import Location, diversify, find_nearest
from ..web import (
    field_bool,
    field_int,
    field_str,
    handle_hex,
    hexh,
    json_response,
    make_middlewares,
    metrics_handler,
    read_json,
    record_id,
    split_listen,
)
from .checkpoint import dump
from .chunkmap import SMALL_TABLE, ChunkMap, ChunkserverInfo
from .leases import LeaseTable
from .oplog import OpLog, recover, write_checkpoint
from .outbox import Key, Kind, Outbox
from .repair import Repair
from .state import MasterState, now_ns
from .writes import WritePath

log = logging.getLogger("kubegfs.master")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


@dataclass
class Options:
    dead_after: float = 5.0
    checkpoint_interval: float = 300.0
    checkpoint_ops: int = 100_000
    rereplicate_interval: float = 2.0
    fsync: bool = True
    snapshot_retry_seconds: float = 120.0
    fork_builds: bool = True  # build SnapObj records in a forked child (own core, own GIL)
    sync: Callable[[int], None] | None = None  # the op log's fdatasync (a seam for tests)
    fsync_delay: float = 0.0  # act like a slow disk: each op-log sync takes this much longer


class Master:
    def __init__(
        self, data_dir: Path, token: str, location: Location, chunk_size: int, replication: int,
        options: Options | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.token = token
        self.location = location
        self.opts = options or Options()
        state, self.recovery = recover(data_dir, chunk_size, replication)
        shutil.rmtree(data_dir / "scratch", ignore_errors=True)  # half-built records of a crash
        self.state: MasterState = state
        self.oplog = OpLog(data_dir, state.seq + 1, fsync=self.opts.fsync, sync=_slow_sync(self.opts))
        self.outbox = Outbox(lambda: self.oplog.next_seq - 1, lambda: self.oplog.durable_seq, self._still_wanted)
        self.leases = LeaseTable(on_abandon=self._abandoned)
        self.chunkmap = ChunkMap(state, self.leases, on_dead=lambda cs: self.outbox.forget(cs.id))
        self.writes = WritePath(self)
        self.repair = Repair(self)
        self.builders: dict[str, asyncio.Task[Any]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ops_since_checkpoint = self.recovery.replayed
        self._last_checkpoint = time.monotonic()
        self._checkpointing = False
        self._bad_record_copies: dict[str, set[str]] = {}  # snapshot id -> servers whose copy rotted
        self._record_missing: dict[tuple[str, str], int] = {}  # (server, snapshot id) -> heartbeats without it
        self._ls_cache: dict[int, tuple[ns.Dir, list[str]]] = {}
        self._pending_init = state.seq == 0
        self._chunk_size_cfg = chunk_size
        self._replication_cfg = replication

    # ------------------------------------------------------------------ plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=make_middlewares(self.token, M.MASTER_HTTP), client_max_size=8 << 20)
        r = app.router
        r.add_get("/healthz", self.h_healthz)
        r.add_get("/readyz", self.h_healthz)
        r.add_get("/metrics", self.h_metrics)
        r.add_get("/api/v1/status", self.h_status)
        r.add_get("/api/v1/chunkservers", self.h_chunkservers)
        r.add_post("/api/v1/fs/mkdir", self.h_mkdir)
        r.add_get("/api/v1/fs/stat", self.h_stat)
        r.add_get("/api/v1/fs/ls", self.h_ls)
        r.add_post("/api/v1/fs/rm", self.h_rm)
        r.add_post("/api/v1/fs/mv", self.h_mv)
        r.add_post("/api/v1/fs/open", self.h_open)
        r.add_post("/api/v1/fs/alloc", self.h_alloc)
        r.add_post("/api/v1/fs/commit", self.h_commit)
        r.add_post("/api/v1/fs/abort", self.h_abort)
        r.add_get("/api/v1/fs/layout", self.h_layout)
        r.add_post("/api/v1/snapshots", self.h_snap_create)
        r.add_get("/api/v1/snapshots", self.h_snap_list)
        r.add_get("/api/v1/snapshots/{ref}", self.h_snap_show)
        r.add_delete("/api/v1/snapshots/{ref}", self.h_snap_delete)
        r.add_post("/api/v1/snapshots/{ref}/restore", self.h_snap_restore)
        r.add_post("/api/v1/admin/checkpoint", self.h_checkpoint)
        r.add_get("/api/v1/admin/dump", self.h_dump)
        r.add_post("/internal/heartbeat", self.h_heartbeat)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=120, connect=3),
        )
        if self._pending_init:
            await self.mutate({"op": "init", "chunk_size": self._chunk_size_cfg, "replication": self._replication_cfg})
        elif self._chunk_size_cfg != self.state.chunk_size:
            log.warning("configured chunk size %d ignored: this file system uses %d",
                        self._chunk_size_cfg, self.state.chunk_size)
        await self.mutate({"op": "incarnation", "n": self.state.incarnation + 1})
        for p in self.recovery.problems:
            log.error("recovery: %s", p)
        log.info("recovered to seq %d (checkpoint %d + %d ops replayed) in %.3fs",
                 self.state.seq, self.recovery.checkpoint_seq, self.recovery.replayed, self.recovery.seconds)
        for sid in list(self.state.pins):
            log.info("resuming snapshot %s interrupted by a restart", sid)
            self._start_builder(sid)
        self._tasks += [
            asyncio.create_task(self._liveness_loop()),
            asyncio.create_task(self.repair.loop(self.opts.rereplicate_interval)),
            asyncio.create_task(self._checkpoint_loop()),
        ]

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks + list(self.builders.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self.builders.values(), return_exceptions=True)
        await self.oplog.drain()
        self.oplog.close()
        if self._session:
            await self._session.close()

    async def mutate(self, op: dict[str, Any], apply_seconds: Histogram | None = None) -> Any:
        """Apply ``op`` and wait until it is durable. The only way state changes.
        ``apply_seconds`` observes how long the in-memory apply held the loop."""
        t0 = time.perf_counter()
        self.oplog.stamp(op)
        try:
            result = self.state.apply(op)
        except BaseException:
            self.oplog.next_seq -= 1
            raise
        if apply_seconds is not None:
            apply_seconds.observe(time.perf_counter() - t0)
        fut = self.oplog.enqueue(op)
        self._ops_since_checkpoint += 1
        await fut
        M.M_OPLOG_RECORDS.inc()
        M.M_OPLOG_FSYNC.observe(time.perf_counter() - t0)
        return result

    async def call_cs(self, cs: ChunkserverInfo, method: str, path: str, **kw: Any) -> Any:
        assert self._session is not None
        async with self._session.request(method, cs.address + path, **kw) as resp:
            try:
                body = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {"message": (await resp.text())[:300]}
            if resp.status >= 300:
                raise from_json(resp.status, body)
            return body

    # ------------------------------------------------------------------ small handlers

    async def h_healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True, "seq": self.state.seq})

    async def h_metrics(self, request: web.Request) -> web.StreamResponse:
        self._update_gauges()
        return await metrics_handler(M.MASTER)(request)

    def _update_gauges(self) -> None:
        st = self.state
        M.M_CHUNKS.set(len(st.version))
        M.M_FILES.set(st.n_files)
        alive = sum(1 for c in self.chunkmap.cs.values() if c.alive)
        M.M_CHUNKSERVERS.labels("alive").set(alive)
        M.M_CHUNKSERVERS.labels("dead").set(len(self.chunkmap.cs) - alive)
        for c in self.chunkmap.cs.values():
            M.M_CS_CAPACITY.labels(c.id, c.location.zone).set(c.capacity)
            M.M_CS_USED.labels(c.id, c.location.zone).set(c.used)
        for s in ("pending", "ready", "failed"):
            M.M_SNAPSHOTS.labels(s).set(sum(1 for e in st.snapshots.values() if e["state"] == s))
        self.chunkmap.under_replicated_count()
        self.under_copied()

    async def h_status(self, request: web.Request) -> web.Response:
        st = self.state
        if len(st.version) <= SMALL_TABLE:
            under, _lost, sample = self.chunkmap.scan_replication(limit=5)
        else:  # from the last re-replication scan
            under, sample = self.chunkmap.last_under_count, []
        return json_response({
            "seq": st.seq, "epoch": st.epoch, "chunk_size": st.chunk_size,
            "replication": st.replication, "files": st.n_files, "directories": st.n_dirs,
            "logical_bytes": st.n_bytes, "chunks": len(st.version), "snapshots": len(st.snapshots),
            "chunkservers": {"alive": len(self.chunkmap.alive()), "total": len(self.chunkmap.cs)},
            "under_replicated": under,
            "snapshots_under_copied": self.under_copied(),
            "under_replicated_sample": [
                {"handle": hexh(h), "live_replicas": len(self.chunkmap.locations.get(h, ())),
                 "holders": sorted(c for c in self.chunkmap.cs if h in self.chunkmap.cs[c].chunks)}
                for h in sample
            ],
            "cow_clones": st.cow_clones, "location": self.location.to_json(),
            "recovery": {"checkpoint_seq": self.recovery.checkpoint_seq,
                         "replayed": self.recovery.replayed, "problems": self.recovery.problems},
        })

    async def h_chunkservers(self, request: web.Request) -> web.Response:
        return json_response({"chunkservers": [c.to_json() for c in self.chunkmap.cs.values()]})

    async def h_dump(self, request: web.Request) -> web.Response:
        return json_response(dump(self.state))

    async def h_checkpoint(self, request: web.Request) -> web.Response:
        path = await self.checkpoint()
        return json_response({"checkpoint": path.name, "seq": self.state.seq})

    # ------------------------------------------------------------------ namespace

    async def h_mkdir(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        op = self.state.prepare_mkdir(field_str(b, "path"), field_bool(b, "parents"),
                                      field_int(b, "mode", ns.DEFAULT_DIR_MODE, 0, 0o7777))
        await self.mutate(op)
        return json_response({"path": op["path"]}, status=201)

    def _stat(self, path: str, node: ns.Node) -> dict[str, Any]:
        if isinstance(node, ns.File):
            return {"path": path, "type": "file", "size": node.size, "mode": node.mode,
                    "mtime_ns": node.mtime, "chunks": len(node.chunks)}
        return {"path": path, "type": "dir", "mode": node.mode, "mtime_ns": node.mtime,
                "entries": len(node.children)}

    async def h_stat(self, request: web.Request) -> web.Response:
        parts, node = self.state.lookup(request.query.get("path", ""))
        return json_response(self._stat(paths.join(parts), node))

    async def h_ls(self, request: web.Request) -> web.Response:
        parts, node = self.state.lookup(request.query.get("path", ""))
        base = paths.join(parts)
        if isinstance(node, ns.File):
            return json_response({"path": base, "entries": [self._stat(base, node)], "next": None})
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError as exc:
            raise InvalidArgument("limit must be an integer") from exc
        limit = max(1, min(limit, 10000))
        after = request.query.get("after", "")
        names = self._sorted_names(node)
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start : start + limit]
        entries = [self._stat(base.rstrip("/") + "/" + n, node.children[n]) for n in page]
        nxt = page[-1] if start + limit < len(names) else None
        return json_response({"path": base, "entries": entries, "next": nxt})

    def _sorted_names(self, node: ns.Dir) -> list[str]:
        """A directory's names in order. Directories are immutable, so the sorted list of one
        node object stays valid: paging through a million entries sorts them once, not per page."""
        hit = self._ls_cache.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        names = sorted(node.children.keys())
        if len(names) > 1000:
            if len(self._ls_cache) >= 8:
                self._ls_cache.pop(next(iter(self._ls_cache)))
            self._ls_cache[id(node)] = (node, names)
        return names

    async def h_rm(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        op = self.state.prepare_rm(field_str(b, "path"), field_bool(b, "recursive"))
        self.leases.check_none_below(op["path"])
        await self.mutate(op)
        return json_response({"removed": op["path"]})

    async def h_mv(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        op = self.state.prepare_mv(field_str(b, "src"), field_str(b, "dst"))
        self.leases.check_none_below(op["src"])
        await self.mutate(op)
        return json_response({"moved": op["src"], "to": op["dst"]})

    # ------------------------------------------------------------------ write path

    def _abandoned(self, h: int, ids: list[str]) -> None:
        """Copies of a chunk placed for a write that did not commit it: garbage."""
        for i in ids:
            self.outbox.order(i, "chunk", h)

    async def h_open(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        return json_response(await self.writes.open(
            field_str(b, "path"), field_str(b, "mode", "create"),
            field_int(b, "file_mode", ns.DEFAULT_FILE_MODE, 0, 0o7777)))

    async def h_alloc(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        return json_response(self.writes.alloc(field_str(b, "lease", max_len=64)))

    async def h_abort(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        lid = field_str(b, "lease", max_len=64)
        self.leases.drop(lid)
        return json_response({"aborted": lid})

    async def h_commit(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        lid = field_str(b, "lease", max_len=64)
        size = field_int(b, "size", None, 0)
        raw_chunks = b.get("chunks")
        if not isinstance(raw_chunks, list):
            raise InvalidArgument("chunks must be a list of {handle, replicas}")
        handles: list[int] = []
        acked: dict[int, list[str]] = {}
        for item in raw_chunks:
            if not isinstance(item, dict):
                raise InvalidArgument("each chunk must be an object")
            h = handle_hex(field_str(item, "handle"))
            handles.append(h)
            reps = item.get("replicas", [])
            if not isinstance(reps, list) or not all(isinstance(x, str) for x in reps):
                raise InvalidArgument("replicas must be a list of chunkserver ids")
            acked[h] = reps
        return json_response(await self.writes.commit(lid, size, handles, acked))

    async def h_layout(self, request: web.Request) -> web.Response:
        parts, node = self.state.lookup(request.query.get("path", ""))
        if not isinstance(node, ns.File):
            raise InvalidArgument(f"{paths.join(parts)} is a directory")
        near = Location(request.query.get("node", ""), request.query.get("zone", ""),
                        request.query.get("region", ""), request.query.get("ip", "") or (request.remote or ""))
        chunks = []
        for h in node.chunks:
            reps = [c.candidate() for c in self.chunkmap.replicas_of(h)]
            ranked = find_nearest(near, reps)
            chunks.append({"handle": hexh(h), "version": self.state.version.get(h, 0),
                           "replicas": [{"id": r.candidate.id, "address": r.candidate.address} for r in ranked]})
        return json_response({"path": paths.join(parts), "size": node.size, "mode": node.mode,
                              "mtime_ns": node.mtime, "chunk_size": self.state.chunk_size, "chunks": chunks})

    # ------------------------------------------------------------------ snapshots

    def _snap_json(self, e: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in e.items() if k not in ("handles_z", "created_ns")}
        out["live_copies"] = self._live_copies(e)
        return out

    def _live_copies(self, e: dict[str, Any]) -> int:
        """Holders of a record copy that are alive (each copy is checked against the catalog at
        every heartbeat, see _check_record_copies)."""
        return sum(1 for h in e["holders"] if h["id"] in self.chunkmap.cs and self.chunkmap.cs[h["id"]].alive)

    def under_copied(self) -> int:
        n = sum(1 for e in self.state.snapshots.values()
                if e["state"] == "ready" and self._live_copies(e) < e["copies"])
        M.M_SNAP_UNDER_COPIED.set(n)
        return n

    async def h_snap_create(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        name = field_str(b, "name", max_len=253)
        if not NAME_RE.fullmatch(name):
            raise InvalidArgument("snapshot name: letters, digits, '.', '_' and '-' (max 253)")
        path = paths.normalize(field_str(b, "path"))
        copies = field_int(b, "copies", 2, 1, 16)
        sid = record_id(field_str(b, "id", "s-" + uuid.uuid4().hex, max_len=128))
        try:
            wait = min(10.0, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError as exc:
            raise InvalidArgument("wait must be a number of seconds") from exc
        targets = b.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or len(targets) > 256:
            raise InvalidArgument("targets must be a list of chunkserver ids or addresses")
        near = b.get("near") or {}
        if not isinstance(near, dict):
            raise InvalidArgument("near must be an object {node, zone, region, ip}")
        labels = b.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise InvalidArgument("labels must be a string map")
        st = self.state
        if sid in st.snapshots:
            e = st.snapshots[sid]
            if e["name"] != name or e["path"] != path:
                raise Conflict(f"snapshot id {sid} already exists with another name or path")
            await self._wait_built(sid, wait)
            e = st.snapshots[sid]
            return json_response(self._snap_json(e), status=200 if e["state"] != "pending" else 202)
        if name in st.snapshot_names:
            raise AlreadyExists(f"a snapshot named {name!r} already exists")
        st.lookup(path)  # must exist
        op = {"op": "snap_capture", "id": sid, "name": name, "path": path, "created": now_ns(),
              "copies": copies, "targets": targets, "near": Location.from_json(near).to_json(),
              "labels": labels}
        await self.mutate(op, apply_seconds=M.M_SNAP_CAPTURE)  # O(1): pins the current immutable root
        self._start_builder(sid)
        await self._wait_built(sid, wait)
        e = st.snapshots[sid]
        return json_response(self._snap_json(e), status=200 if e["state"] != "pending" else 202)

    async def _wait_built(self, sid: str, wait: float) -> None:
        """Long poll: give a small snapshot the chance to be ready in the same request."""
        task = self.builders.get(sid)
        if wait > 0 and task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), wait)

    def _start_builder(self, sid: str) -> None:
        if sid not in self.builders or self.builders[sid].done():
            self.builders[sid] = asyncio.create_task(self._build(sid))

    def _rank_holders(self, entry: dict[str, Any]) -> list[tuple[ChunkserverInfo, str]]:
        ref = Location.from_json(entry.get("near")) if entry.get("near") else self.location
        if not (ref.node or ref.zone or ref.region or ref.ip):
            ref = self.location
        alive = {c.id: c for c in self.chunkmap.alive()}
        ranked = find_nearest(ref, [c.candidate() for c in alive.values()])
        targets = entry.get("targets") or []
        if targets:
            by_addr = {c.address: c.id for c in alive.values()}
            by_addr.update({urlsplit(c.address).hostname or "": c.id for c in alive.values()})
            order = [by_addr.get(t, t) for t in targets]
            pos = {cid: i for i, cid in enumerate(order)}
            ranked.sort(key=lambda r: pos.get(r.candidate.id, len(order)))
        ranked = diversify(ranked, entry["copies"]) if not targets else ranked
        return [(alive[r.candidate.id], r.reason) for r in ranked]

    async def _build(self, sid: str) -> None:
        st = self.state
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.opts.snapshot_retry_seconds
        loop = asyncio.get_running_loop()
        try:
            entry = st.snapshots[sid]
            pin = st.pins[sid]
            meta = {k: entry[k] for k in ("id", "name", "path", "created", "epoch")}
            meta["chunk_size"] = st.chunk_size
            if self.opts.fork_builds:
                rec = await loop.run_in_executor(None, build_record_in_child, meta, pin.node,
                                                 st.version.__getitem__, self.data_dir / "scratch")
            else:
                rec = await loop.run_in_executor(None, build_record, meta, pin.node, st.version.__getitem__)
            t_built = time.perf_counter()
            holders: list[dict[str, Any]] = []
            last_err = "no live chunkserver"
            delay = 0.5
            headers = {"X-Kubegfs-Sha256": rec.sha256, "X-Kubegfs-Snapshot-Name": entry["name"],
                       "X-Kubegfs-Created": entry["created"]}

            async def ship(cs: ChunkserverInfo, reason: str) -> dict[str, Any] | None:
                nonlocal last_err
                try:
                    await self.call_cs(cs, "PUT", f"/internal/records/{sid}", data=rec.data, headers=headers)
                except (TimeoutError, KubegfsError, aiohttp.ClientError, OSError) as exc:
                    last_err = f"{cs.id}: {exc}"
                    log.warning("snapshot %s: shipping to %s failed: %s", sid, cs.id, exc)
                    return None
                cs.records.add(sid)
                self.outbox.cancel(cs.id, "record", sid)
                return {"id": cs.id, "address": cs.address, **cs.location.to_json(), "reason": reason}

            while True:
                # ship to the nearest candidates at once; fall back down the ranking for failures
                tried: set[str] = set()
                while len(holders) < entry["copies"]:
                    todo = [(cs, why) for cs, why in self._rank_holders(entry)
                            if cs.id not in tried and all(h["id"] != cs.id for h in holders)]
                    todo = todo[: entry["copies"] - len(holders)]
                    if not todo:
                        break
                    tried |= {cs.id for cs, _ in todo}
                    done = await asyncio.gather(*(ship(cs, why) for cs, why in todo))
                    holders += [h for h in done if h is not None]
                if holders or time.monotonic() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            # keep the ranking's order (nearest first) whatever order the copies finished in
            rank = {cs.id: i for i, (cs, _why) in enumerate(self._rank_holders(entry))}
            holders.sort(key=lambda h: rank.get(h["id"], len(rank)))
            if not holders:
                await self.mutate({"op": "snap_fail", "id": sid, "error": f"no chunkserver took the record: {last_err}"})
                M.M_SNAP_RESULT.labels("failed").inc()
                return
            dur = time.perf_counter() - t0
            t_shipped = time.perf_counter()
            # count the snapshot's chunk references in slices so writers never wait long; the
            # snapshot is still pending, so every chunk in it is treated as shared meanwhile
            for i in range(0, len(rec.handles), 20_000):
                st.count_snapshot_refs(rec.handles[i : i + 20_000])
                await asyncio.sleep(0)
            await self.mutate({
                "op": "snap_commit", "id": sid, "sha256": rec.sha256, "record_bytes": len(rec.data),
                "holders": holders, "files": rec.counts["files"], "dirs": rec.counts["dirs"],
                "chunks": rec.counts["chunks"], "logical_bytes": rec.counts["bytes"],
                "duration_seconds": round(dur, 6), "handles_z": rec.handles_z,
                "location_reason": holders[0]["reason"], "_precounted": True,
            })
            M.M_SNAP_BUILD.observe(dur)
            M.M_SNAP_RECORD.observe(len(rec.data))
            M.M_SNAP_RESULT.labels("success").inc()
            log.info("snapshot %s (%s) of %s ready: %d files, %d record bytes on %s in %.3fs "
                     "(built %.3fs, shipped %.3fs, committed %.3fs)",
                     entry["name"], sid, entry["path"], rec.counts["files"], len(rec.data),
                     ",".join(h["id"] for h in holders), time.perf_counter() - t0, t_built - t0,
                     t_shipped - t_built, time.perf_counter() - t_shipped)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("snapshot %s failed", sid)
            if sid in st.pins:
                await self.mutate({"op": "snap_fail", "id": sid, "error": str(exc)})
                M.M_SNAP_RESULT.labels("failed").inc()
        finally:
            self.builders.pop(sid, None)

    async def h_snap_list(self, request: web.Request) -> web.Response:
        snaps = sorted(self.state.snapshots.values(), key=lambda e: e["created_ns"])
        return json_response({"snapshots": [self._snap_json(e) for e in snaps]})

    async def h_snap_show(self, request: web.Request) -> web.Response:
        e = self.state.snapshot_by_ref(request.match_info["ref"])
        return json_response(self._snap_json(e))

    async def h_snap_delete(self, request: web.Request) -> web.Response:
        e = self.state.snapshot_by_ref(request.match_info["ref"])
        if e["state"] == "pending":
            raise Conflict(f"snapshot {e['name']} is still being taken; delete it when it is ready")
        await self.mutate({"op": "snap_delete", "id": e["id"]})
        for h in e.get("holders", []):  # the copies go with the holders' next heartbeats
            if h["id"] in self.chunkmap.cs:
                self.outbox.order(h["id"], "record", e["id"])
        return json_response({"deleted": e["name"], "id": e["id"]})

    async def fetch_record(self, e: dict[str, Any]) -> tuple[ParsedRecord, bytes, dict[str, Any]]:
        """The record from the nearest healthy holder; fall back on error or bad checksum."""
        holders = []
        for h in e.get("holders", []):
            cs = self.chunkmap.cs.get(h["id"])
            if cs and cs.alive:
                holders.append(cs)
        ranked = find_nearest(self.location, [c.candidate() for c in holders])
        errors = []
        bad = 0
        assert self._session is not None
        loop = asyncio.get_running_loop()
        for r in ranked:
            cs = self.chunkmap.cs[r.candidate.id]
            try:
                async with self._session.get(f"{cs.address}/internal/records/{e['id']}") as resp:
                    if resp.status != 200:
                        raise from_json(resp.status, await resp.json(content_type=None))
                    data = await resp.read()
                parsed = await loop.run_in_executor(None, parse_record, data, e["sha256"])
                return parsed, data, {"id": cs.id, "address": cs.address, **cs.location.to_json()}
            except (NotFound, CorruptData, ValueError) as exc:  # the copy itself is bad: heal the catalog
                errors.append(f"{cs.id}: {exc}")
                bad += 1
                why = "missing" if isinstance(exc, NotFound) else "not the catalog's bytes"
                await self.drop_record_copy(e["id"], cs.id, why)
                if why != "missing":
                    self.outbox.order(cs.id, "record", e["id"])
            except (TimeoutError, KubegfsError, aiohttp.ClientError, OSError) as exc:
                log.warning("snapshot %s: copy on %s unusable: %s", e["id"], cs.id, exc)
                errors.append(f"{cs.id}: {exc}")
        if (ranked and bad == len(ranked)) or (not e.get("holders") and self._bad_record_copies.get(e["id"])):
            raise Unavailable(f"every record copy of snapshot {e['name']} is missing or damaged"
                              + (": " + "; ".join(errors) if errors else ""))
        raise Unavailable(f"no usable copy of snapshot {e['name']}: " + ("; ".join(errors) or "no live holder"))

    async def h_snap_restore(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            resp = await self._restore(request)
        except Exception:
            M.M_RESTORE_RESULT.labels("failed").inc()
            raise
        M.M_RESTORE_RESULT.labels("success").inc()
        M.M_RESTORE.observe(time.perf_counter() - t0)
        return resp

    async def _restore(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        b = await read_json(request)
        rid = record_id(field_str(b, "id")) if b.get("id") is not None else ""
        ref = request.match_info["ref"]
        to = paths.join(paths.split(field_str(b, "to"))) if b.get("to") is not None else None
        if rid and rid in self.state.restores:
            return self._repeated_restore(rid, ref, to)
        e = self.state.snapshot_by_ref(ref)
        if e["state"] != "ready":
            raise Conflict(f"snapshot {e['name']} is {e['state']}, not ready")
        if to is not None:
            parts = paths.split(to)
            mode = "new"
        else:
            parts = paths.split(e["path"])
            mode = "inplace"
        self._check_target(parts, mode)
        parsed, blob, source = await self.fetch_record(e)
        self._check_target(parts, mode)  # re-check: the namespace may have moved on meanwhile
        st = self.state
        missing = [h for h, _v in parsed.chunks if h not in st.version]
        if missing:
            raise CorruptData(f"snapshot references {len(missing)} chunks the master no longer has")
        if mode == "inplace":
            self.leases.check_none_below(paths.join(parts))
        if rid and rid in self.state.restores:  # a concurrent twin finished first
            return self._repeated_restore(rid, ref, to)
        summary = {"snapshot": e["name"], "snapshot_id": e["id"], "path": paths.join(parts), "mode": mode,
                   "source": source, "duration_seconds": round(time.perf_counter() - t0, 6)}
        result = await self.mutate({"op": "restore", "id": e["id"], "path": paths.join(parts), "mode": mode,
                                    "blob": blob, "mtime": now_ns(), "_parsed": parsed, "rid": rid,
                                    "summary": summary})
        return json_response({**summary, **result})

    def _repeated_restore(self, rid: str, ref: str, to: str | None) -> web.Response:
        """The stored result of restore ``rid``, if this request asks for the same thing."""
        done = self.state.restores[rid]
        same = ref in (done.get("snapshot"), done.get("snapshot_id")) and (
            done.get("mode") == "inplace" if to is None else (done.get("mode") == "new" and done.get("path") == to))
        if not same:
            raise Conflict(f"restore id {rid} was already used to restore {done.get('snapshot')} to {done.get('path')}")
        return json_response({**done, "repeated": True})

    def _check_target(self, parts: tuple[str, ...], mode: str) -> None:
        st = self.state
        if not parts:
            if mode == "new":
                raise InvalidArgument("cannot restore to /")
            return
        ns.must_dir(st.root, parts[:-1])
        if mode == "new" and ns.get(st.root, parts) is not None:
            raise AlreadyExists(f"restore target {paths.join(parts)} already exists")

    # ------------------------------------------------------------------ heartbeats & repair

    async def h_heartbeat(self, request: web.Request) -> web.Response:
        b = await read_json(request, limit=64 << 20)
        cid = field_str(b, "id", max_len=128)
        address = field_str(b, "address", max_len=300)
        if not address.startswith(("http://", "https://")):
            raise InvalidArgument("address must be an http(s) URL")
        loc = Location.from_json(b.get("location"))
        st = self.state
        full = field_bool(b, "full", False)
        cs = self.chunkmap.heard_from(cid, address, loc, full)
        if cs is None:
            return json_response({"reregister": True, "chunk_size": st.chunk_size})
        cs.capacity = field_int(b, "capacity_bytes", 0)
        cs.used = field_int(b, "used_bytes", 0)
        cs.free = field_int(b, "free_bytes", 0)
        delete = self.chunkmap.reconcile(cs, b, full)
        if full:  # records this chunkserver should hold but lost (e.g. a new disk)
            recs = set(b.get("records") or [])
            for e in list(st.snapshots.values()):
                if e["state"] == "ready" and any(h["id"] == cid for h in e["holders"]) and e["id"] not in recs:
                    await self.drop_record_copy(e["id"], cid, "missing")
        records = b.get("records") or []
        if not isinstance(records, list):
            raise InvalidArgument("records must be a list")
        cs.records = {r for r in records if isinstance(r, str)}
        delete_records = {r for r in cs.records if r not in st.snapshots}
        digests = b.get("record_digests") or {}
        if not isinstance(digests, dict):
            raise InvalidArgument("record_digests must be an object {id: [size, sha256]}")
        delete_records |= await self._check_record_copies(cs, digests)
        bad_records = b.get("corrupt_records") or []
        if not isinstance(bad_records, list):
            raise InvalidArgument("corrupt_records must be a list")
        for rid in bad_records:
            if not isinstance(rid, str):
                continue
            await self.drop_record_copy(rid, cid, "corrupt")
            if rid in cs.records:
                delete_records.add(rid)
        for h in delete:
            self.outbox.order(cid, "chunk", h)
        for rid in delete_records:
            self.outbox.order(cid, "record", rid)
        gone, gone_records = self.outbox.take(cid)  # only what rests on durable ops (see outbox.py)
        if gone:
            M.M_GC.inc(len(gone))
        return json_response({
            "delete_chunks": [hexh(h) for h in gone],
            "delete_records": gone_records,
            "chunk_size": st.chunk_size,
        })

    def _still_wanted(self, cid: str, kind: Kind, key: Key) -> bool | None:
        """Re-check a queued deletion when it is released (see outbox.py); None: not while a
        write lease holds the chunk."""
        if kind == "chunk":
            assert isinstance(key, int)
            if self.leases.allocated(key):
                return None
            return key not in self.state.version or cid not in self.chunkmap.locations.get(key, ())
        e = self.state.snapshots.get(str(key))
        return e is None or (e["state"] != "pending" and all(h["id"] != cid for h in e["holders"]))

    async def _check_record_copies(self, cs: ChunkserverInfo, digests: dict[str, Any]) -> set[str]:
        """Compare the records a holder reports with the catalog: a copy missing from two
        heartbeats in a row (one may predate a copy just shipped), of the wrong size or with
        another sha256 is dropped and re-made elsewhere. Returns the ids whose bad copy to delete."""
        bad: set[str] = set()
        for e in list(self.state.snapshots.values()):
            if e["state"] != "ready" or all(h["id"] != cs.id for h in e["holders"]):
                continue
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
        e = self.state.snapshots.get(sid)
        if e is None or all(h["id"] != cid for h in e["holders"]):
            return
        log.error("snapshot %s: the record copy on %s is %s; dropped, re-copying from a good one",
                  e["name"], cid, why)
        M.M_RECORD_DROPPED.labels(why).inc()
        self._record_missing.pop((cid, sid), None)
        self._bad_record_copies.setdefault(sid, set()).add(cid)
        self.chunkmap.dirty = True
        await self.mutate({"op": "snap_holders", "id": sid,
                           "holders": [h for h in e["holders"] if h["id"] != cid]})

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.opts.dead_after / 4))
            self.chunkmap.expire(self.opts.dead_after)

    async def repair_records(self) -> int:
        """Bring every ready snapshot back to its number of record copies (e.g. after a holder
        died, lost its disk or reported its copy corrupt), each new copy in a new zone if any."""
        made = 0
        for e in list(self.state.snapshots.values()):
            if e["state"] != "ready":
                continue
            live = [h for h in e["holders"] if h["id"] in self.chunkmap.cs and self.chunkmap.cs[h["id"]].alive]
            if len(live) >= e["copies"] or not live:
                if not live and e["holders"]:
                    log.error("snapshot %s has no live record copy", e["name"])
                continue
            held = {h["id"] for h in e["holders"]}
            zones = {(h.get("region", ""), h.get("zone", "")) for h in live}
            options = [(cs, why) for cs, why in self._rank_holders({**e, "targets": []})
                       if cs.id not in held and not self.outbox.pending(cs.id, "record", e["id"])]
            rotted = self._bad_record_copies.get(e["id"], set())
            # prefer a new zone, and a disk that did not just corrupt this record
            options.sort(key=lambda o: (o[0].id in rotted, (o[0].location.region, o[0].location.zone) in zones))
            if not options:
                self.chunkmap.dirty = True
                continue
            target, why = options[0]
            try:
                _parsed, data, _src = await self.fetch_record(e)
                await self.call_cs(target, "PUT", f"/internal/records/{e['id']}", data=data,
                                   headers={"X-Kubegfs-Sha256": e["sha256"]})
            except (TimeoutError, KubegfsError, aiohttp.ClientError, OSError) as exc:
                M.M_RECORD_REPAIRS.labels("failed").inc()
                log.warning("re-copying snapshot %s to %s failed: %s", e["name"], target.id, exc)
                self.chunkmap.dirty = True
                continue
            self.outbox.cancel(target.id, "record", e["id"])
            cur = self.state.snapshots.get(e["id"])
            if cur is None:
                continue
            holder = {"id": target.id, "address": target.address, **target.location.to_json(), "reason": why}
            await self.mutate({"op": "snap_holders", "id": e["id"], "holders": cur["holders"] + [holder]})
            target.records.add(e["id"])
            M.M_RECORD_REPAIRS.labels("success").inc()
            log.info("snapshot %s: record re-copied to %s (%s)", e["name"], target.id, target.location.zone)
            made += 1
        return made

    # ------------------------------------------------------------------ checkpoints

    async def checkpoint(self) -> Path:
        if self._checkpointing:
            raise Conflict("a checkpoint is already being written")
        self._checkpointing = True
        try:
            view = self.state.checkpoint_view()
            await self.oplog.rotate()
            path = await asyncio.get_running_loop().run_in_executor(None, write_checkpoint, self.data_dir, view)
            self._ops_since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            M.M_CHECKPOINTS.labels("success").inc()
            log.info("checkpoint %s written", path.name)
            return path
        except Exception:
            M.M_CHECKPOINTS.labels("failed").inc()
            raise
        finally:
            self._checkpointing = False

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            due = self._ops_since_checkpoint >= self.opts.checkpoint_ops or (
                self._ops_since_checkpoint and time.monotonic() - self._last_checkpoint > self.opts.checkpoint_interval
            )
            if due and not self.state.pins:
                try:
                    await self.checkpoint()
                except Exception:  # noqa: BLE001
                    log.exception("checkpoint failed")


def _slow_sync(opts: Options) -> Callable[[int], None] | None:
    sync = opts.sync
    if opts.fsync_delay <= 0:
        return sync

    def slow(fd: int) -> None:
        time.sleep(opts.fsync_delay)  # a busy disk (the chaos runner's slow-fsync mode)
        (sync or os.fdatasync)(fd)

    return slow


def run(listen: str, data_dir: Path, token: str, location: Location, chunk_size: int,
        replication: int, options: Options | None = None) -> None:
    host, port = split_listen(listen)
    loc = location if location.ip else Location(location.node, location.zone, location.region, host)
    m = Master(data_dir, token, loc, chunk_size, replication, options)
    log.info("master listening on %s, data in %s", listen, data_dir)
    web.run_app(m.app(), host=host, port=port, print=None, access_log=None, handle_signals=True)
