"""The master process: the composition root (the pieces, the app, the lifecycle, ``mutate``).

Request → ``prepare`` (validate; nothing changes on error) → op stamped, applied and queued for
the op log → the answer waits until the op is durable (group commit), so nothing acknowledged
is ever lost; nothing is deleted on a chunkserver before the op that freed it is durable.

The rooms: ``http`` (routes, body parsing), ``state`` (the state machine), ``oplog`` and
``checkpoint`` (durability), ``outbox`` (the deletion gate), ``leases`` (write leases),
``chunkmap`` (chunkservers, replica locations, liveness, heartbeat reconcile), ``writes`` (open,
alloc, commit, version bumps), ``snapshots`` (capture, build/ship, restore, delete, record
copies), ``repair`` (re-replication).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Histogram

from .. import metrics as M
from ..auth import Tokens, master_policy
from ..errors import (
    Conflict,
    InvalidArgument,
    from_json,
)
from ..heap import map_big_blocks, trim_heap
from ..topology import Location
from ..web import (
    CLUSTER_HEADER,
    RequestMetrics,
    hexh,
    make_middlewares,
    peer_session,
    run_app,
    split_listen,
)
from . import ops
from .chunkmap import ChunkMap, ChunkserverInfo
from .fastpath import SPIN, FastProtocol
from .fastpath import routes as fast_routes
from .fastpath import writes as fast_writes
from .guard import Guard
from .http import Api
from .identity import open_identity
from .leases import LeaseTable
from .metareplica import Candidate as MetaCandidate
from .metareplica import MetaReplicationConfig, MetaReplicator
from .oplog import OpLog, recover, write_checkpoint
from .outbox import Key, Kind, Outbox
from .repair import Repair
from .safemode import SafeModeConfig
from .snapshots import Snapshots
from .state import MasterState
from .writes import WritePath

log = logging.getLogger("kubegfs.master")



@dataclass
class Options:
    dead_after: float = 5.0
    checkpoint_interval: float = 300.0
    checkpoint_ops: int = 100_000
    rereplicate_interval: float = 2.0
    fsync: bool = True
    snapshot_retry_seconds: float = 120.0
    sync: Callable[[int], None] | None = None  # the op log's fdatasync (a seam for tests)
    fsync_delay: float = 0.0  # act like a slow disk: each op-log sync takes this much longer
    format: bool = False  # --format: confirm an empty or refusing data dir as a new cluster
    safe_mode: SafeModeConfig = field(default_factory=SafeModeConfig)
    meta: MetaReplicationConfig = field(default_factory=MetaReplicationConfig)
    fast_listen: str = ""  # HOST:PORT of the lean stat/ls/stat_many listener (master/fastpath.py), or off
    fast_spin: float = SPIN  # seconds it polls a connection for the next request after answering (0: off)


class Master:
    def __init__(
        self, data_dir: Path, token: str | Tokens, location: Location, chunk_size: int, replication: int,
        options: Options | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.tokens = token if isinstance(token, Tokens) else Tokens(token)
        self.token = self.tokens.of("internal")  # what the master presents to chunkservers
        self.location = location
        self.opts = options or Options()
        self.guard = Guard(data_dir, open_identity(data_dir, self.opts.format), self.opts.safe_mode)
        state, self.recovery = recover(data_dir, chunk_size, replication)
        trim_heap()  # the recovery's transients: gone from the heap, not yet from RSS
        shutil.rmtree(data_dir / "scratch", ignore_errors=True)  # left by the forked builder of older versions
        self.state: MasterState = state
        self.oplog = OpLog(data_dir, state.seq + 1, fsync=self.opts.fsync, sync=_slow_sync(self.opts))
        self.outbox = Outbox(lambda: self.oplog.next_seq - 1, lambda: self.oplog.durable_seq, self._still_wanted)
        self.outbox.holds.append(self.guard.hold_reason)  # safe mode / refusing: nothing leaves
        self.guard.waiting = self.outbox.waiting
        self.leases = LeaseTable(on_abandon=self._abandoned)
        self.chunkmap = ChunkMap(state, self.leases, on_dead=lambda cs: self.outbox.forget(cs.id))
        self.writes = WritePath(self)
        self.repair = Repair(self)
        self.meta = MetaReplicator(
            self.opts.meta, data_dir, lambda: self.guard.ident.history, lambda: self._session,
            lambda: [MetaCandidate(c.id, c.address, c.location) for c in self.chunkmap.alive()], location)
        self.meta.attach(self.oplog)
        self.snapshots = Snapshots(self)
        self._tasks: list[asyncio.Task[Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._ops_since_checkpoint = self.recovery.replayed
        self._last_checkpoint = time.monotonic()
        self._checkpointing = False
        self._pending_init = state.seq == 0
        self._chunk_size_cfg = chunk_size
        self._replication_cfg = replication
        self.fast_port = split_listen(self.opts.fast_listen)[1] if self.opts.fast_listen else None
        self.ssl_context: ssl.SSLContext | None = None  # the listeners' TLS (run() sets it)
        self._fast_server: asyncio.AbstractServer | None = None

    # ------------------------------------------------------------------ plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[*make_middlewares(self.tokens, M.MASTER_HTTP, master_policy),
                                           self.guard.middleware()], client_max_size=8 << 20)
        api = Api(self)
        api.add_routes(app.router)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        if self.opts.fast_listen:
            async def start_fast(app: web.Application) -> None:
                host, port = split_listen(self.opts.fast_listen)
                proto = partial(FastProtocol, fast_routes(api), self.tokens, master_policy, self.guard.check,
                                RequestMetrics(M.MASTER_HTTP), spin=0.0 if self.ssl_context else self.opts.fast_spin,
                                deferred=fast_writes(api))
                self._fast_server = await asyncio.get_running_loop().create_server(
                    proto, host, port, ssl=self.ssl_context, reuse_address=True)
                log.info("stat/ls/stat_many/mkdir/create also on %s (lean listener)", self.opts.fast_listen)

            async def stop_fast(app: web.Application) -> None:
                if self._fast_server is not None:
                    self._fast_server.close()

            app.on_startup.append(start_fast)
            app.on_cleanup.append(stop_fast)
        return app

    async def reset_session(self) -> None:
        """A new client session (e.g. after ``recover`` changed the cluster id it sends)."""
        if self._session:
            await self._session.close()
        self._session = peer_session(self.token, aiohttp.ClientTimeout(total=120, connect=3),
                                     {CLUSTER_HEADER: self.guard.cluster_id})

    async def _start(self, app: web.Application) -> None:
        await self.reset_session()
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
            asyncio.create_task(self.meta.run()),
        ]

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks + list(self.snapshots.builders.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self.snapshots.builders.values(), return_exceptions=True)
        await self.oplog.drain()
        self.oplog.close()
        if self._session:
            await self._session.close()

    async def mutate(self, op: ops.Op, apply_seconds: Histogram | None = None) -> Any:
        """Apply ``op`` and wait until it is durable. The only way state changes.
        ``apply_seconds`` observes how long the in-memory apply held the loop."""
        result, durable = self.submit(op, apply_seconds)
        await durable
        return result

    def submit(self, op: ops.Op, apply_seconds: Histogram | None = None) -> tuple[Any, Awaitable[None]]:
        """Apply ``op`` now and log it: its result and what to await for it to be durable. Work
        that only the op's own later ops (logged after it, so durable only after it) can make
        visible may start before then."""
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
        self.snapshots.changed()

        async def durable() -> None:
            await fut
            M.M_OPLOG_RECORDS.inc()
            M.M_OPLOG_FSYNC.observe(time.perf_counter() - t0)

        return result, durable()

    async def call_cs(self, cs: ChunkserverInfo, method: str, path: str, **kw: Any) -> Any:
        return await self.call_url(method, cs.address + path, **kw)

    async def call_url(self, method: str, url: str, **kw: Any) -> Any:
        """A chunkserver's answer, decoded; a non-2xx answer raises its KubegfsError."""
        assert self._session is not None
        async with self._session.request(method, url, **kw) as resp:
            try:
                body = await resp.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {"message": (await resp.text())[:300]}
            if resp.status >= 300:
                raise from_json(resp.status, body)
            return body

    def _abandoned(self, h: int, ids: list[str]) -> None:
        """Copies of a chunk placed for a write that did not commit it: garbage."""
        for i in ids:
            self.outbox.order(i, "chunk", h)

    async def heartbeat(self, cs: ChunkserverInfo, b: dict[str, Any], full: bool) -> dict[str, Any]:
        """Fold a heartbeat into the chunk map and the record catalog; the reply carries only the
        deletions the gate releases (see outbox.py)."""
        st = self.state
        cid = cs.id
        cs.deleting.clear()  # the last reply's deletes are done (heartbeats come one at a time)
        delete = self.chunkmap.reconcile(cs, b, full)
        # the records: a full report, or what changed since the one taken last (recordreport.py)
        kind, named = cs.record_view.fold(b)
        if kind == "full":
            cs.records = named
        elif kind == "changes":
            for r in named:
                if r in cs.record_view.digests:
                    cs.records.add(r)
                else:
                    cs.records.discard(r)
        if full and kind == "full":  # records this chunkserver should hold but lost (e.g. a new disk)
            for e in list(st.held_by(cid)):
                if e["state"] == "ready" and any(h["id"] == cid for h in e["holders"]) and e["id"] not in named:
                    await self.snapshots.drop_record_copy(e["id"], cid, "missing")
        delete_records = {r for r in (cs.records if kind == "full" else named & cs.records) if r not in st.snapshots}
        if kind != "stale":
            delete_records |= await self.snapshots.check_record_copies(
                cs, cs.record_view.digests, None if kind == "full" else named)
        bad_records = b.get("corrupt_records") or []
        if not isinstance(bad_records, list):
            raise InvalidArgument("corrupt_records must be a list")
        for rid in bad_records:
            if not isinstance(rid, str):
                continue
            await self.snapshots.drop_record_copy(rid, cid, "corrupt")
            if rid in cs.records:
                delete_records.add(rid)
        self.snapshots.blocks_heartbeat(cs, b, full)
        for h in delete:
            self.outbox.order(cid, "chunk", h)
        for rid in delete_records:
            self.outbox.order(cid, "record", rid)
        gone, gone_records = self.outbox.take(cid)  # only what rests on durable ops (see outbox.py)
        cs.deleting.update(gone)
        gone_blocks = self.outbox.take_blocks(cid)
        self.snapshots.blocks_released(cid, gone_blocks)
        if gone:
            M.M_GC.inc(len(gone))
        return {"delete_chunks": [hexh(h) for h in gone], "delete_records": gone_records,
                "delete_blocks": gone_blocks, "records_delta": True, **({"records_full": True} if kind == "stale" else {}),
                "chunk_size": st.chunk_size, **self.guard.reply()}

    def _still_wanted(self, cid: str, kind: Kind, key: Key) -> bool | None:
        """Re-check a queued deletion when it is released (see outbox.py); None: not while a
        write lease holds the chunk."""
        if kind == "chunk":
            assert isinstance(key, int)
            if self.leases.allocated(key):
                return None
            return key not in self.state.version or cid not in self.chunkmap.locations.get(key, ())
        if kind == "block":
            return self.snapshots.block_still_wanted(str(key))
        e = self.state.snapshots.get(str(key))
        return e is None or (e["state"] != "pending" and all(h["id"] != cid for h in e["holders"]))

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.opts.dead_after / 4))
            self.guard.tick(self.state.version, self.chunkmap.locations)
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
            await self.meta.on_checkpoint(view["seq"])
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


def run(listen: str, data_dir: Path, token: str | Tokens, location: Location, chunk_size: int,
        replication: int, options: Options | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
    host, port = split_listen(listen)
    loc = location if location.ip else Location(location.node, location.zone, location.region, host)
    map_big_blocks()
    m = Master(data_dir, token, loc, chunk_size, replication, options)
    m.ssl_context = ssl_context
    log.info("master listening on %s (%s), data in %s", listen, "https" if ssl_context else "http", data_dir)
    run_app(m.app(), host, port, ssl_context)
