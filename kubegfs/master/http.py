"""The master's HTTP API: routes and body parsing only. Each handler turns a request into
typed arguments (4xx JSON on anything malformed, via ``web.py``), calls the piece that owns the
work (``MasterState.prepare_*``, the write path, snapshots, the chunk map) and answers JSON.
"""

from __future__ import annotations

import bisect
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import metrics as M
from .. import namespace as ns
from .. import paths, wire
from ..errors import InvalidArgument, KubegfsError
from ..topology import Location, find_nearest
from ..web import (
    encode_body,
    encoded_response,
    field_bool,
    field_int,
    field_str,
    handle_hex,
    hexh,
    json_response,
    metrics_handler,
    read_json,
    record_id,
    wants_msgpack,
)
from .checkpoint import dump
from .chunkmap import SMALL_TABLE
from .fastpath import HEADER as FAST_HEADER
from .fastpath import WRITES_HEADER as FAST_WRITES_HEADER

if TYPE_CHECKING:
    from .server import Master

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
MAX_STAT_MANY = 10_000
PAGE_CACHE = 64  # encoded ls pages kept
PAGE_CACHE_BYTES = 256 << 10  # larger pages are not kept


def _writer(request: web.Request) -> Location:
    """Where a writer is, as far as the master can tell (its address): new chunks' replicas
    are listed nearest to it first, the head of the write chain."""
    return Location("", "", "", request.remote or "")


class Api:
    def __init__(self, m: Master) -> None:
        self.m = m
        self._ls_cache: dict[int, tuple[ns.Dir, list[str]]] = {}
        # (id(dir), path, after, limit, msgpack?) -> (dir, encoded page, content type)
        self._pages: dict[tuple[int, str, str, int, bool], tuple[ns.Dir, bytes, str]] = {}

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/healthz", self.h_healthz)
        r.add_get("/readyz", self.h_healthz)
        r.add_get("/metrics", self.h_metrics)
        r.add_get("/api/v1/status", self.h_status)
        r.add_get("/api/v1/chunkservers", self.h_chunkservers)
        r.add_post("/api/v1/fs/mkdir", self.h_mkdir)
        r.add_get("/api/v1/fs/stat", self.h_stat)
        r.add_post("/api/v1/fs/stat_many", self.h_stat_many)
        r.add_get("/api/v1/fs/ls", self.h_ls)
        r.add_post("/api/v1/fs/rm", self.h_rm)
        r.add_post("/api/v1/fs/mv", self.h_mv)
        r.add_post("/api/v1/fs/open", self.h_open)
        r.add_post("/api/v1/fs/create", self.h_create)
        r.add_post("/api/v1/fs/alloc", self.h_alloc)
        r.add_post("/api/v1/fs/commit", self.h_commit)
        r.add_post("/api/v1/fs/abort", self.h_abort)
        r.add_get("/api/v1/fs/layout", self.h_layout)
        r.add_post("/api/v1/snapshots", self.h_snap_create)
        r.add_get("/api/v1/snapshots", self.h_snap_list)
        r.add_get("/api/v1/snapshots/{ref}", self.h_snap_show)
        r.add_delete("/api/v1/snapshots/{ref}", self.h_snap_delete)
        r.add_post("/api/v1/snapshots/{ref}/restore", self.h_snap_restore)
        r.add_get("/api/v1/snapshots/{ref}/diff", self.h_snap_diff)
        r.add_post("/api/v1/admin/checkpoint", self.h_checkpoint)
        r.add_get("/api/v1/admin/dump", self.h_dump)
        r.add_post("/api/v1/admin/recover", self.h_recover)
        r.add_post("/internal/heartbeat", self.h_heartbeat)

    # ------------------------------------------------------------------ small handlers

    async def h_healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True, "seq": self.m.state.seq})

    async def h_metrics(self, request: web.Request) -> web.StreamResponse:
        self._update_gauges()
        return await metrics_handler(M.MASTER)(request)

    def _update_gauges(self) -> None:
        st = self.m.state
        M.M_CHUNKS.set(len(st.version))
        M.M_FILES.set(st.n_files)
        alive = sum(1 for c in self.m.chunkmap.cs.values() if c.alive)
        M.M_CHUNKSERVERS.labels("alive").set(alive)
        M.M_CHUNKSERVERS.labels("dead").set(len(self.m.chunkmap.cs) - alive)
        for c in self.m.chunkmap.cs.values():
            M.M_CS_CAPACITY.labels(c.id, c.location.zone).set(c.capacity)
            M.M_CS_USED.labels(c.id, c.location.zone).set(c.used)
        for s in ("pending", "ready", "failed"):
            M.M_SNAPSHOTS.labels(s).set(sum(1 for e in st.snapshots.values() if e["state"] == s))
        self.m.chunkmap.under_replicated_count()
        self.m.snapshots.under_copied()
        self.m.guard.update_gauges()
        self.m.meta.update_gauges()

    async def h_status(self, request: web.Request) -> web.Response:
        st = self.m.state
        if len(st.version) <= SMALL_TABLE:
            under, _lost, sample = self.m.chunkmap.scan_replication(limit=5)
        else:  # from the last re-replication scan
            under, sample = self.m.chunkmap.last_under_count, []
        return json_response({
            "seq": st.seq, "epoch": st.epoch, "chunk_size": st.chunk_size,
            "replication": st.replication, "files": st.n_files, "directories": st.n_dirs,
            "logical_bytes": st.n_bytes, "chunks": len(st.version), "snapshots": len(st.snapshots),
            "chunkservers": {"alive": len(self.m.chunkmap.alive()), "total": len(self.m.chunkmap.cs)},
            "under_replicated": under,
            "snapshots_under_copied": self.m.snapshots.under_copied(),
            "under_replicated_sample": [
                {"handle": hexh(h), "live_replicas": len(self.m.chunkmap.locations.get(h, ())),
                 "holders": sorted(c for c in self.m.chunkmap.cs if h in self.m.chunkmap.cs[c].chunks)}
                for h in sample
            ],
            "cow_clones": st.cow_clones, "location": self.m.location.to_json(),
            "recovery": {"checkpoint_seq": self.m.recovery.checkpoint_seq,
                         "replayed": self.m.recovery.replayed, "problems": self.m.recovery.problems},
            "cluster": self.m.guard.status(),
            "conditions": [*self.m.guard.conditions(), self.m.meta.condition()],
            "metadata_replication": self.m.meta.status(),
        })

    async def h_chunkservers(self, request: web.Request) -> web.Response:
        return json_response({"chunkservers": [c.to_json() for c in self.m.chunkmap.cs.values()]})

    async def h_dump(self, request: web.Request) -> web.Response:
        return json_response(dump(self.m.state))

    async def h_recover(self, request: web.Request) -> web.Response:
        from .recovery import h_recover

        return await h_recover(self.m, request)

    async def h_checkpoint(self, request: web.Request) -> web.Response:
        path = await self.m.checkpoint()
        return json_response({"checkpoint": path.name, "seq": self.m.state.seq})

    # ------------------------------------------------------------------ namespace

    async def h_mkdir(self, request: web.Request) -> web.Response:
        return self._advertise_writes(json_response(await self.mkdir_of(await read_json(request)), status=201))

    # mkdir and create are also served by the lean listener (fastpath.py), answered 201 there too

    async def mkdir_of(self, b: dict[str, Any]) -> dict[str, Any]:
        op = self.m.state.prepare_mkdir(field_str(b, "path"), field_bool(b, "parents"),
                                      field_int(b, "mode", ns.DEFAULT_DIR_MODE, 0, 0o7777))
        await self.m.mutate(op)
        return {"path": op["path"]}

    async def create_of(self, b: dict[str, Any]) -> dict[str, Any]:
        """A file in one round trip, durable before the answer: empty (open + commit of nothing),
        or with ``data`` (bytes, so a msgpack body; at most wire.SMALL_FILE) stored on the
        replicas and synced first (WritePath.create_small)."""
        mode = "overwrite" if field_bool(b, "overwrite") else "create"
        data = b.get("data", b"")
        if not isinstance(data, bytes):
            raise InvalidArgument("field 'data' must be bytes (a msgpack bin; JSON cannot carry it)")
        return await self.m.writes.create_small(
            field_str(b, "path"), mode, field_int(b, "file_mode", ns.DEFAULT_FILE_MODE, 0, 0o7777), data)

    def _stat(self, path: str, node: ns.Node) -> wire.Stat:
        if isinstance(node, ns.File):
            return {"path": path, "type": "file", "size": node.size, "mode": node.mode,
                    "mtime_ns": node.mtime, "chunks": len(node.chunks)}
        return {"path": path, "type": "dir", "mode": node.mode, "mtime_ns": node.mtime,
                "entries": len(node.children)}

    # stat, stat_many and ls are also served by the lean listener (fastpath.py): the answers
    # are made here, once, for both

    def stat_of(self, path: str) -> wire.Stat:
        parts, node = self.m.state.lookup(path)
        return self._stat(paths.join(parts), node)

    def stat_many_of(self, b: dict[str, Any]) -> dict[str, Any]:
        """Many stats in one call: ``{"paths": [...]}`` → ``{"stats": [...]}`` in the same
        order, a path that cannot be looked up as ``{"path", "error", "message"}``."""
        want = b.get("paths")
        if not isinstance(want, list) or not all(isinstance(p, str) for p in want):
            raise InvalidArgument("paths must be a list of strings")
        if len(want) > MAX_STAT_MANY:
            raise InvalidArgument(f"at most {MAX_STAT_MANY} paths per call")
        out: list[wire.Stat | wire.StatError] = []
        for p in want:
            try:
                parts, node = self.m.state.lookup(p)
            except KubegfsError as err:
                out.append({"path": p, "error": err.code, "message": err.message})
                continue
            out.append(self._stat(paths.join(parts), node))
        return {"stats": out}

    def ls_page(self, path: str, after: str, limit_arg: str | None, packed: bool) -> tuple[bytes, str]:
        """A page of a directory with every entry's stat, encoded. Directory nodes are
        immutable, so an encoded page of one node object stays right until the directory
        changes (which makes a new node): repeated listings of a hot directory are served from a
        small cache."""
        parts, node = self.m.state.lookup(path)
        base = paths.join(parts)
        if isinstance(node, ns.File):
            return encode_body(wire.LsPage(path=base, entries=[self._stat(base, node)], next=None), packed)
        try:
            limit = int(limit_arg or "1000")
        except ValueError as exc:
            raise InvalidArgument("limit must be an integer") from exc
        limit = max(1, min(limit, 10000))
        key = (id(node), base, after, limit, packed)
        hit = self._pages.get(key)
        if hit is not None and hit[0] is node:
            return hit[1], hit[2]
        names = self._sorted_names(node)
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start : start + limit]
        entries = [self._stat(base.rstrip("/") + "/" + n, node.children[n]) for n in page]
        nxt = page[-1] if start + limit < len(names) else None
        body, ctype = encode_body(wire.LsPage(path=base, entries=entries, next=nxt), packed)
        if len(body) <= PAGE_CACHE_BYTES:
            if len(self._pages) >= PAGE_CACHE:
                self._pages.pop(next(iter(self._pages)))
            self._pages[key] = (node, body, ctype)
        return body, ctype

    def _advertise(self, resp: web.Response) -> web.Response:
        """Name the lean listener's port (if it runs) on the answers it could have given."""
        if self.m.fast_port is not None:
            resp.headers[FAST_HEADER] = str(self.m.fast_port)
        return resp

    def _advertise_writes(self, resp: web.Response) -> web.Response:
        """Name the lean listener's port on mkdir and create answers (which it serves too)."""
        if self.m.fast_port is not None:
            resp.headers[FAST_WRITES_HEADER] = str(self.m.fast_port)
        return resp

    async def h_stat(self, request: web.Request) -> web.Response:
        return self._advertise(json_response(self.stat_of(request.query.get("path", ""))))

    async def h_stat_many(self, request: web.Request) -> web.Response:
        return self._advertise(json_response(self.stat_many_of(await read_json(request))))

    async def h_ls(self, request: web.Request) -> web.Response:
        q = request.query
        return self._advertise(encoded_response(
            *self.ls_page(q.get("path", ""), q.get("after", ""), q.get("limit"), wants_msgpack())))

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
        op = self.m.state.prepare_rm(field_str(b, "path"), field_bool(b, "recursive"))
        self.m.leases.check_none_below(op["path"])
        await self.m.mutate(op)
        return json_response({"removed": op["path"]})

    async def h_mv(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        op = self.m.state.prepare_mv(field_str(b, "src"), field_str(b, "dst"))
        self.m.leases.check_none_below(op["src"])
        await self.m.mutate(op)
        return json_response({"moved": op["src"], "to": op["dst"]})

    # ------------------------------------------------------------------ write path

    async def h_open(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        return json_response(await self.m.writes.open(
            field_str(b, "path"), field_str(b, "mode", "create"),
            field_int(b, "file_mode", ns.DEFAULT_FILE_MODE, 0, 0o7777), alloc=field_bool(b, "alloc"),
            near=_writer(request)))

    async def h_create(self, request: web.Request) -> web.Response:
        return self._advertise_writes(json_response(await self.create_of(await read_json(request)), status=201))

    async def h_alloc(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        return json_response(self.m.writes.alloc(field_str(b, "lease", max_len=64), _writer(request)))

    async def h_abort(self, request: web.Request) -> web.Response:
        b = await read_json(request)
        lid = field_str(b, "lease", max_len=64)
        self.m.leases.drop(lid)
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
        return json_response(await self.m.writes.commit(lid, size, handles, acked))

    async def h_layout(self, request: web.Request) -> web.Response:
        parts, node = self.m.state.lookup(request.query.get("path", ""))
        if not isinstance(node, ns.File):
            raise InvalidArgument(f"{paths.join(parts)} is a directory")
        near = Location(request.query.get("node", ""), request.query.get("zone", ""),
                        request.query.get("region", ""), request.query.get("ip", "") or (request.remote or ""))
        chunks = []
        for h in node.chunks:
            reps = [c.candidate() for c in self.m.chunkmap.replicas_of(h)]
            ranked = find_nearest(near, reps)
            best = ranked[0].reason if ranked else None
            # "near": in the nearest one's distance class (same node, zone, region, or only IP
            # proximity; the IP prefix length only orders them). A client spreads its reads over
            # those, as HDFS shuffles the replicas at the same network distance.
            chunks.append({"handle": hexh(h), "version": self.m.state.version.get(h, 0),
                           "replicas": [{"id": r.candidate.id, "address": r.candidate.address,
                                         "near": r.reason == best} for r in ranked]})
        return json_response({"path": paths.join(parts), "size": node.size, "mode": node.mode,
                              "mtime_ns": node.mtime, "chunk_size": self.m.state.chunk_size, "chunks": chunks})

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
        e = await self.m.snapshots.create(sid, name, path, copies, targets, near, labels, wait)
        info = self.m.snapshots.snap_json(e)
        return json_response(info, status=200 if info["state"] != "pending" else 202)

    async def h_snap_list(self, request: web.Request) -> web.Response:
        snaps = sorted(self.m.state.snapshots.values(), key=lambda e: e["created_ns"])
        return json_response({"snapshots": [self.m.snapshots.snap_json(e) for e in snaps]})

    async def h_snap_show(self, request: web.Request) -> web.Response:
        e = self.m.state.snapshot_by_ref(request.match_info["ref"])
        return json_response(self.m.snapshots.snap_json(e))

    async def h_snap_delete(self, request: web.Request) -> web.Response:
        return json_response(await self.m.snapshots.delete(request.match_info["ref"]))

    async def h_snap_diff(self, request: web.Request) -> web.Response:
        """``?to=REF``: against that snapshot; without it, against the live tree at the path."""
        to = request.query.get("to")
        if to is not None and not to:
            raise InvalidArgument("to must name a snapshot (leave it out to compare with the live tree)")
        return json_response(await self.m.snapshots.diff(request.match_info["ref"], to))

    async def h_snap_restore(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            b = await read_json(request)
            rid = record_id(field_str(b, "id")) if b.get("id") is not None else ""
            to = paths.join(paths.split(field_str(b, "to"))) if b.get("to") is not None else None
            out = await self.m.snapshots.restore(request.match_info["ref"], rid, to)
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
        self.m.guard.admit(cid, address, b)  # another cluster's chunkserver: refused, nothing read
        st = self.m.state
        full = field_bool(b, "full", False)
        cs = self.m.chunkmap.heard_from(cid, address, loc, full)
        if cs is None:
            return json_response({"reregister": True, "chunk_size": st.chunk_size, **self.m.guard.reply()})
        cs.capacity = field_int(b, "capacity_bytes", 0)
        cs.used = field_int(b, "used_bytes", 0)
        cs.free = field_int(b, "free_bytes", 0)
        return json_response(await self.m.heartbeat(cs, b, full))
