"""The master process: namespace + chunk table + snapshot catalog behind an aiohttp API.

Request → ``prepare`` (validate; nothing changes on error) → op stamped, applied and queued for
the op log → the answer waits until the op is durable (group commit), so nothing acknowledged
is ever lost. Snapshot records are built off the event loop from a pinned immutable view and
shipped to the nearest chunkservers, then committed to the catalog.
"""

from __future__ import annotations

import asyncio
import bisect
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

import aiohttp
from aiohttp import web
from prometheus_client import Histogram

from .. import metrics as M
from .. import namespace as ns
from .. import paths
from ..errors import (
    Conflict,
    InvalidArgument,
    from_json,
)
from ..topology import Location, find_nearest
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
from .snapshots import Snapshots
from .state import MasterState
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
        self.snapshots = Snapshots(self)
        self._tasks: list[asyncio.Task[Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ops_since_checkpoint = self.recovery.replayed
        self._last_checkpoint = time.monotonic()
        self._checkpointing = False
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
            self.snapshots.start_builder(sid)
        self._tasks += [
            asyncio.create_task(self._liveness_loop()),
            asyncio.create_task(self.repair.loop(self.opts.rereplicate_interval)),
            asyncio.create_task(self._checkpoint_loop()),
        ]

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks + list(self.snapshots.builders.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self.snapshots.builders.values(), return_exceptions=True)
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
        self.snapshots.under_copied()

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
            "snapshots_under_copied": self.snapshots.under_copied(),
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
        e = await self.snapshots.create(sid, name, path, copies, targets, near, labels, wait)
        return json_response(self.snapshots.snap_json(e), status=200 if e["state"] != "pending" else 202)

    async def h_snap_list(self, request: web.Request) -> web.Response:
        snaps = sorted(self.state.snapshots.values(), key=lambda e: e["created_ns"])
        return json_response({"snapshots": [self.snapshots.snap_json(e) for e in snaps]})

    async def h_snap_show(self, request: web.Request) -> web.Response:
        e = self.state.snapshot_by_ref(request.match_info["ref"])
        return json_response(self.snapshots.snap_json(e))

    async def h_snap_delete(self, request: web.Request) -> web.Response:
        return json_response(await self.snapshots.delete(request.match_info["ref"]))

    async def h_snap_restore(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            b = await read_json(request)
            rid = record_id(field_str(b, "id")) if b.get("id") is not None else ""
            to = paths.join(paths.split(field_str(b, "to"))) if b.get("to") is not None else None
            out = await self.snapshots.restore(request.match_info["ref"], rid, to)
        except Exception:
            M.M_RESTORE_RESULT.labels("failed").inc()
            raise
        M.M_RESTORE_RESULT.labels("success").inc()
        M.M_RESTORE.observe(time.perf_counter() - t0)
        return json_response(out)

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
                    await self.snapshots.drop_record_copy(e["id"], cid, "missing")
        records = b.get("records") or []
        if not isinstance(records, list):
            raise InvalidArgument("records must be a list")
        cs.records = {r for r in records if isinstance(r, str)}
        delete_records = {r for r in cs.records if r not in st.snapshots}
        digests = b.get("record_digests") or {}
        if not isinstance(digests, dict):
            raise InvalidArgument("record_digests must be an object {id: [size, sha256]}")
        delete_records |= await self.snapshots.check_record_copies(cs, digests)
        bad_records = b.get("corrupt_records") or []
        if not isinstance(bad_records, list):
            raise InvalidArgument("corrupt_records must be a list")
        for rid in bad_records:
            if not isinstance(rid, str):
                continue
            await self.snapshots.drop_record_copy(rid, cid, "corrupt")
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

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.opts.dead_after / 4))
            self.chunkmap.expire(self.opts.dead_after)

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
