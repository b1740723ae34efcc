"""The chunkserver process: an aiohttp app over a ChunkStore, plus the heartbeat loop.

Writes are chained as in GFS and HDFS: the client sends a piece to the first replica only,
naming the rest in ``X-Kubegfs-Chain``; each replica forwards the body to the next while it is
still arriving, writes its own copy as it arrives (a piece that extends the chunk goes to disk in
batches while the rest is on the wire; for a synced piece it then fdatasyncs), waits for the
downstream answer and answers with the ids of every replica that stored the piece, its own
first. The client keeps several pieces in flight, so a chunk's pieces may arrive together: each
waits for its turn in offset order (turnstile.py). So the client uploads every byte once, the
disk, the network and the replicas work at the same time, and every hop reuses keep-alive
connections. Pieces take the same path (``accept_piece``) when they arrive on the lean data port
(dataport.py), which the piece answers here name and which clients and forwards then use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .. import merkle
from .. import metrics as M
from ..auth import Tokens, chunkserver_policy
from ..errors import ClusterMismatch, CorruptData, InvalidArgument, NotFound, from_json
from ..heap import keep_heap
from ..rangecrc import READ_PORT_HEADER
from ..recordreport import RECORD_SCAN_EVERY, Reporter
from ..shortcircuit import HOST_HEADER, SOCKET_HEADER, host_id
from ..topology import Location
from ..web import (
    CHAIN_HEADER,
    CLUSTER_HEADER,
    PEER_ERRORS,
    field_int,
    field_str,
    handle_hex,
    hexh,
    json_response,
    make_middlewares,
    metrics_handler,
    parse_chain,
    peer_session,
    query_int,
    read_json,
    record_id,
    run_app,
    split_listen,
)
from . import metaapi
from .blockcache import DEFAULT_BYTES as DEFAULT_BLOCK_CACHE
from .blocks import BlockStore, LogRecord
from .dataport import DATA_PORT_HEADER, BufferPool, DataListener, PeerLinks
from .membership import Membership
from .metastore import MetaStore
from .shortcircuit import ShortCircuitServer, SocketUnusable
from .store import ChunkStore, ReadRange
from .turnstile import Turnstile

log = logging.getLogger("kubegfs.chunkserver")
# how many of the log's records a heartbeat's records pass (every RECORD_SCAN_EVERY) reads and
# checks, in turn, so that a record rotted in the log is reported within a few such passes, not
# only at its next read or scrub (1.4-8 ms a pass at 1k-10k records of 400 B, off the loop: docs/benchmarks.md, lane rot12)
RECORD_CHECK_COUNT = 1024

MAX_PIECE = 8 * 1024 * 1024
STREAM_BATCH = 256 * 1024  # a streamed piece goes to disk in writes of at least this much (its CRC and copy
# then run on bytes that arrived moments ago, still in the CPU cache: 256 KiB measured ~25% faster puts than 1 MiB)


class Chunkserver:
    def __init__(
        self, data_dir: Path, master_url: str, token: str | Tokens, advertise: str, location: Location,
        chunk_size: int | None = None, heartbeat_interval: float = 1.0, cs_id: str | None = None,
        scrub_interval: float = 60.0, data_listen: tuple[str, int] | None = None,
        block_cache: int = DEFAULT_BLOCK_CACHE, short_circuit: Path | None = None,
    ) -> None:
        self.scrub_interval = scrub_interval
        self.data_listen = data_listen  # HOST, PORT (0: any free one) of the data port; None: none
        self.corrupt_records: set[str] = set()
        self.data_dir = data_dir
        self.master_url = master_url.rstrip("/")
        self.tokens = token if isinstance(token, Tokens) else Tokens(token)
        self.token = self.tokens.of("internal")  # what it presents to the master and other chunkservers
        self.advertise = advertise
        self.location = location
        self.heartbeat_interval = heartbeat_interval
        data_dir.mkdir(parents=True, exist_ok=True)
        self.membership = Membership(data_dir / "identity.json")
        saved = self.membership.saved
        self.id = saved.get("id") or cs_id or f"cs-{location.node or 'x'}-{uuid.uuid4().hex[:8]}"
        self.chunk_size = chunk_size or saved.get("chunk_size") or 64 * 1024 * 1024
        self.membership.save(id=self.id, chunk_size=self.chunk_size)
        self.blocks = BlockStore(data_dir, block_cache)  # directory blocks and snapshot records
        self.store = ChunkStore(data_dir, self.chunk_size, self.blocks)
        for rid in self.blocks.damaged_records:  # rot found in the log at the start: as a scrub's finding
            try:
                self.corrupt_records.add(record_id(rid))
            except InvalidArgument:  # (the id itself was hit)
                log.error("a damaged record entry names no valid record id: %r", rid[:200])
        self.meta = MetaStore(data_dir)  # the master's metadata, if it ships a copy here
        self._registered = False
        self._records = Reporter()  # how its heartbeats report its records (kubegfs/recordreport.py)
        self._beats = 0
        # one heartbeat at a time: a reply's deletes are carried out before the next heartbeat is
        # built, which the master relies on (chunkmap.ChunkserverInfo.deleting)
        self._beat_lock = asyncio.Lock()
        self._added: dict[int, int] = {}
        self._removed: set[int] = set()
        self._reported_corrupt: set[int] = set()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.master_ok = False
        self._scrub_pos = 0
        self.turnstile = Turnstile(lambda h: self.store.index.get(h, (0, 0))[1])
        self.data = DataListener(self.accept_piece, self.tokens, self.membership.check_caller, self.chunk_size,
                                 BufferPool(MAX_PIECE), self.open_read,
                                 partial(metaapi.serve_lean_stream, self.meta))
        self.peers = PeerLinks(self.token, lambda: self.membership.cluster_id)
        self.short_circuit_path = short_circuit  # the Unix socket for local clients' reads; None: none
        self.short_circuit: ShortCircuitServer | None = None  # serving, once started
        self._read_headers: dict[str, str] = {}  # named on every main-port read answer

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[*make_middlewares(self.tokens, M.CS_HTTP, chunkserver_policy), self.membership.middleware()],
            client_max_size=MAX_PIECE + 4096
        )
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", metrics_handler(M.CHUNKSERVER))
        r.add_put("/internal/chunks/{h}", self.put_chunk)
        r.add_get("/internal/chunks/{h}", self.get_chunk)
        r.add_delete("/internal/chunks/{h}", self.delete_chunk)
        r.add_post("/internal/chunks/{h}/clone", self.clone_chunk)
        r.add_post("/internal/chunks/{h}/replicate", self.replicate_chunk)
        r.add_post("/internal/chunks/{h}/version", self.set_version)
        r.add_get("/internal/records", self.list_records)
        r.add_put("/internal/records/{id}", self.put_record)
        r.add_get("/internal/records/{id}", self.get_record)
        r.add_delete("/internal/records/{id}", self.delete_record)
        r.add_post("/internal/blocks", self.put_blocks)
        r.add_post("/internal/blocks/get", self.get_blocks)
        r.add_post("/internal/blocks/delta", self.put_block_deltas)
        r.add_get("/internal/info", self.info)
        r.add_post("/internal/scrub", self.scrub)
        metaapi.add_routes(app, self.meta, lambda: self.data.port)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._session = peer_session(self.token, aiohttp.ClientTimeout(total=60, connect=5))
        if self.data_listen is not None:
            port = await self.data.start(*self.data_listen)
            log.info("chunkserver %s takes pieces on data port %d too", self.id, port)
            self._read_headers[READ_PORT_HEADER] = str(port)
        if self.short_circuit_path is not None:
            self._start_short_circuit(self.short_circuit_path)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if self.scrub_interval > 0:
            self._tasks.append(asyncio.create_task(self._scrub_loop()))
        self._update_gauges()

    async def _stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.data.stop()
        if self.short_circuit is not None:
            self.short_circuit.stop()
        self.peers.close()
        if self._session:
            await self._session.close()

    def _start_short_circuit(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        srv = ShortCircuitServer(path, self.tokens, self.id, self.store.open_local,
                                 lambda h: loop.call_soon_threadsafe(self._read_corrupt, h))
        try:
            srv.start()
        except SocketUnusable as exc:
            log.warning("short-circuit local reads off: %s", exc)
            return
        self.short_circuit = srv
        if host := host_id():
            self._read_headers.update({SOCKET_HEADER: os.fspath(path), HOST_HEADER: host})
        log.info("chunkserver %s hands local clients chunk files on %s", self.id, path)

    def _update_gauges(self) -> None:
        M.CS_CHUNKS.set(len(self.store.index))
        M.CS_BYTES.set(self.store.chunk_bytes)
        M.CS_RECORDS.set(len(self.store.record_sizes))

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True, "id": self.id})

    async def readyz(self, request: web.Request) -> web.Response:
        return json_response({"ok": self.master_ok, "id": self.id, "cluster_id": self.membership.cluster_id,
                              "refused": self.membership.refused}, status=200 if self.master_ok else 503)

    async def info(self, request: web.Request) -> web.Response:
        return json_response({
            "id": self.id, "address": self.advertise, "location": self.location.to_json(),
            "chunks": len(self.store.index), "records": self.store.list_records(),
            "chunk_size": self.chunk_size, "cluster_id": self.membership.cluster_id,
            "refused": self.membership.refused,
        })

    async def scrub(self, request: web.Request) -> web.Response:
        checked, bad = await self.scrub_once(max_chunks=1 << 30)
        if bad:
            await self._heartbeat_once()
        return json_response({"checked_chunks": checked, "bad": bad})

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ------------------------------------------------------------------ chunks

    async def put_chunk(self, request: web.Request) -> web.Response:
        """Store a piece and forward it down the chain (see the module docstring). Answers
        ``{"length", "version", "acked": [ids], "failed": {who: message}}``: ``acked`` lists this
        replica and every downstream one that stored the piece; one that did not is in
        ``failed``. If this replica's own write fails the answer is that error (the client
        then sends the piece to the rest of the chain itself). The answer names the data port
        (dataport.py), where later pieces may go."""
        h = handle_hex(request.match_info["h"])
        offset = query_int(request, "offset", 0, 0, self.chunk_size)
        version = query_int(request, "version", None, 1)
        sync = request.query.get("sync", "1") != "0"
        chain = parse_chain(request.headers.get(CHAIN_HEADER, ""))
        expect = request.content_length
        if expect is not None and expect > MAX_PIECE:
            raise InvalidArgument(f"piece larger than {MAX_PIECE} bytes")
        reply = await self.accept_piece(h, offset, version, sync, chain, expect, request.content.iter_any())
        resp = json_response(reply)
        if self.data.port is not None:
            resp.headers[DATA_PORT_HEADER] = str(self.data.port)
        return resp

    async def accept_piece(self, h: int, offset: int, version: int, sync: bool, chain: list[str],
                           expect: int | None, body: AsyncIterator[bytes | memoryview]) -> dict[str, Any]:
        """A piece whose ``body`` parts arrive on either port: stored here and forwarded to
        ``chain`` as they arrive; the answer's JSON object (see ``put_chunk``)."""
        fq: asyncio.Queue[bytes | memoryview | None] = asyncio.Queue()  # unbounded: the piece is held whole anyway
        fwd = asyncio.create_task(self._forward(chain, h, offset, version, sync, _drain(fq), expect)
                                  ) if chain else None
        existed = h in self.store.index  # before the local write below can create it
        lq: asyncio.Queue[bytes | memoryview | BaseException | None] = asyncio.Queue()
        local = asyncio.ensure_future(self._store_piece(h, offset, version, sync, expect, lq))
        local.add_done_callback(_quiet)  # awaited below, unless the body breaks off
        parts: list[bytes | memoryview] = []
        n = 0
        try:
            async for part in body:
                n += len(part)
                if n > MAX_PIECE:
                    raise InvalidArgument(f"piece larger than {MAX_PIECE} bytes")
                parts.append(part)
                lq.put_nowait(part)
                fq.put_nowait(part)
        except BaseException as exc:
            if fwd is not None:
                fwd.cancel()  # the next replica sees a cut body and stores nothing
            lq.put_nowait(exc)  # the local writer stops after its current write, records nothing
            raise
        lq.put_nowait(None)
        fq.put_nowait(None)
        acked: list[str] = []
        failed: dict[str, str] = {}
        rest = chain
        while fwd is not None:
            try:
                reply = await fwd
                acked = [str(i) for i in reply.get("acked", [])]
                failed.update({str(k): str(v) for k, v in (reply.get("failed") or {}).items()})
                break
            except PEER_ERRORS as exc:
                # route around it, as HDFS's pipeline recovery does: the rest still get the piece
                failed[rest[0]] = f"{exc.__class__.__name__}: {exc}"
                rest = rest[1:]
                fwd = asyncio.ensure_future(
                    self._forward(rest, h, offset, version, sync, _once(parts), n)) if rest else None
        length = await local
        M.CS_WRITE_BYTES.inc(n)
        self._added[h] = version
        self._removed.discard(h)
        if not existed:
            self._update_gauges()
        return {"length": length, "version": version, "acked": [self.id, *acked], "failed": failed}

    async def _store_piece(self, h: int, offset: int, version: int, sync: bool, expect: int | None,
                           q: asyncio.Queue[bytes | memoryview | BaseException | None]) -> int:
        """Write a piece's parts from ``q`` as they arrive, in its turn among the chunk's pieces.
        A piece that extends the chunk goes to disk in batches of at least STREAM_BATCH bytes
        while the rest is still on the wire; one that rewrites existing bytes (a resend) is
        written only once it is whole, so a cut body never changes acknowledged bytes."""
        async with self.turnstile.turn(h, offset):
            if offset < self.store.index.get(h, (0, 0))[1]:
                whole = [p async for p in _parts(q)]
                return int(await self._run(self.store.write, h, offset, whole, version, sync))
            w = await self._run(self.store.writer, h, offset, version, MAX_PIECE if expect is None else expect)
            try:
                batch: list[bytes | memoryview] = []
                size = 0
                async for p in _parts(q):
                    batch.append(p)
                    size += len(p)
                    if size >= STREAM_BATCH:
                        await self._run(w.feed, batch)
                        batch, size = [], 0
                if batch:
                    await self._run(w.feed, batch)
                return int(await self._run(self.store.finish, w, sync))
            finally:
                w.close()  # no executor call is running: each was awaited (this task is never cancelled)

    async def _forward(self, chain: list[str], h: int, offset: int, version: int, sync: bool,
                       body: AsyncIterator[bytes | memoryview], length: int | None) -> dict[str, Any]:
        """Send the piece (its parts as they arrive) to ``chain[0]``, naming the rest: to its
        data port once an answer has named it (dataport.py), else to its main port."""
        assert self._session is not None
        base = chain[0]
        target = f"/internal/chunks/{hexh(h)}?offset={offset}&version={version}&sync={'1' if sync else '0'}"
        if length is not None and base in self.peers.ports:
            try:
                return await self.peers.forward(base, urlsplit(base).hostname or "", target, chain[1:], length, body)
            except ConnectionRefusedError:
                self.peers.forget(base)  # nothing was sent: the main port gets the whole piece
        headers = {CHAIN_HEADER: ",".join(chain[1:])}
        if length is not None:
            headers["Content-Length"] = str(length)
        if self.membership.cluster_id:
            headers[CLUSTER_HEADER] = self.membership.cluster_id
        async with self._session.put(f"{base}{target}", data=body, headers=headers) as resp:
            self.peers.learn(base, resp.headers.get(DATA_PORT_HEADER))
            reply = await _safe_json(resp)
            if resp.status != 200:
                raise from_json(resp.status, reply)
            if not isinstance(reply, dict):
                raise InvalidArgument(f"{base} answered a piece with {str(reply)[:100]}")
            return reply

    async def get_chunk(self, request: web.Request) -> web.StreamResponse:
        h = handle_hex(request.match_info["h"])
        offset = query_int(request, "offset", 0, 0, self.chunk_size)
        length = query_int(request, "length", MAX_PIECE, 0, MAX_PIECE)
        min_version = query_int(request, "version", 0, 0)
        try:
            data = await self._run(self.store.read, h, offset, length, min_version)
        except CorruptData:
            self._read_corrupt(h)
            raise
        M.CS_READ_BYTES.inc(len(data))
        v, size = self.store.index.get(h, (0, 0))
        headers = {"X-Kubegfs-Chunk-Length": str(size), "X-Kubegfs-Version": str(v),
                   "Content-Type": "application/octet-stream"}
        headers.update(self._read_headers)
        return await send_body(request, data, headers)

    async def open_read(self, h: int, offset: int, length: int, min_version: int) -> ReadRange:
        """A client-verified read on the data port (dataport.py): the chunk file opened and the
        blocks to send, with the same refusals as ``get_chunk``."""
        try:
            rr: ReadRange = await self._run(self.store.open_range, h, offset, length, min_version)
        except CorruptData:
            self._read_corrupt(h)
            raise
        M.CS_READ_BYTES.inc(rr.length)
        return rr

    def _read_corrupt(self, h: int) -> None:
        M.CS_CHECKSUM_FAIL.labels("chunk").inc()
        log.error("checksum failure on chunk %016x; reporting it to the master", h)
        asyncio.create_task(self._heartbeat_once())

    async def delete_chunk(self, request: web.Request) -> web.Response:
        h = handle_hex(request.match_info["h"])
        await self._run(self.store.delete, h)
        self._removed.add(h)
        self._added.pop(h, None)
        self._update_gauges()
        return json_response({"deleted": hexh(h)})

    async def clone_chunk(self, request: web.Request) -> web.Response:
        src = handle_hex(request.match_info["h"])
        body = await read_json(request)
        dst = handle_hex(field_str(body, "dst"))
        version = field_int(body, "version", None, 1)
        await self._run(self.store.clone, src, dst, version)
        M.CS_CLONES.inc()
        self._added[dst] = version
        self._update_gauges()
        return json_response({"cloned": hexh(dst)})

    async def set_version(self, request: web.Request) -> web.Response:
        h = handle_hex(request.match_info["h"])
        body = await read_json(request)
        version = field_int(body, "version", None, 1)
        await self._run(self.store.set_version, h, version)
        self._added[h] = version
        return json_response({"handle": hexh(h), "version": version})

    async def replicate_chunk(self, request: web.Request) -> web.Response:
        """Pull a copy of a chunk from another chunkserver (re-replication)."""
        h = handle_hex(request.match_info["h"])
        body = await read_json(request)
        source = field_str(body, "source", max_len=300)
        version = field_int(body, "version", None, 1)
        assert self._session is not None
        offset = 0
        if h in self.store.index:
            await self._run(self.store.delete, h)
        try:
            while True:
                async with self._session.get(
                    f"{source}/internal/chunks/{hexh(h)}",
                    params={"offset": str(offset), "length": str(MAX_PIECE), "version": str(version)},
                ) as resp:
                    if resp.status != 200:
                        raise from_json(resp.status, await _safe_json(resp))
                    data = await resp.read()
                    total = int(resp.headers.get("X-Kubegfs-Chunk-Length", "0"))
                if data or offset == 0:
                    last = offset + len(data) >= total
                    await self._run(self.store.write, h, offset, data, version, last)
                offset += len(data)
                if offset >= total or not data:
                    break
        except BaseException:
            await self._run(self.store.delete, h)  # never keep a partial copy
            raise
        self._added[h] = version
        self._update_gauges()
        return json_response({"replicated": hexh(h), "length": offset})

    # ------------------------------------------------------------------ records

    async def list_records(self, request: web.Request) -> web.Response:
        return json_response({"records": self.store.list_records()})

    async def put_record(self, request: web.Request) -> web.Response:
        rid = record_id(request.match_info["id"])
        sha = request.headers.get("X-Kubegfs-Sha256", "")
        if len(sha) != 64:
            raise InvalidArgument("missing or malformed X-Kubegfs-Sha256 header")
        pieces: list[bytes] = []
        async for piece in request.content.iter_chunked(1 << 20):
            pieces.append(piece)
        return json_response((await self._store_record(rid, pieces, sha))[1], status=201)

    async def _store_record(self, rid: str, pieces: list[bytes], sha: str,
                            store: Callable[[LogRecord], Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Store a snapshot record (verified against ``sha``, durable) in one worker job, alone or
        by ``store(record)`` (the blocks it reaches and the record in one synced append); (what
        ``store`` returned, what the answer says of the record)."""
        first: list[Any] = []  # [] until ``store`` runs (the record is checked before), then what it returned

        def blocks(rec: LogRecord) -> None:
            assert store is not None
            first.append(None)
            first[0] = store(rec)

        def job() -> tuple[Any, tuple[int, str]]:
            try:
                got = self.store.put_record(rid, iter(pieces), sha, None if store is None else blocks)
            except CorruptData:
                if not first:  # the record's bytes (a block's count as such in ``store``)
                    M.CS_CHECKSUM_FAIL.labels("record").inc()
                raise
            return (first[0] if first else None), got

        first, (n, digest) = await self._run(job)
        self.corrupt_records.discard(rid)
        self._update_gauges()
        log.info("stored snapshot record %s (%d bytes, sha256 %s…)", rid, n, digest[:12])
        return first, {"id": rid, "bytes": n, "sha256": digest, "holder": self.id}

    async def get_record(self, request: web.Request) -> web.StreamResponse:
        rid = record_id(request.match_info["id"])
        src, sha = await self._run(self.store.record, rid)
        if request.query.get("verify", "1") != "0":
            ok = await self._run(self.store.record_matches, src, sha)  # the bytes served, read once
            if not ok:
                M.CS_CHECKSUM_FAIL.labels("record").inc()
                self.corrupt_records.add(rid)
                log.error("snapshot record %s failed its checksum", rid)
                raise CorruptData(f"record {rid} on {self.id} failed its checksum")
        headers = {"X-Kubegfs-Sha256": sha, "Content-Type": "application/octet-stream"}
        if isinstance(src, bytes):
            return web.Response(body=src, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = src.stat().st_size
        await resp.prepare(request)
        with open(src, "rb") as f:
            for piece in _iter_file(f):
                await resp.write(piece)
        await resp.write_eof()
        return resp

    async def delete_record(self, request: web.Request) -> web.Response:
        rid = record_id(request.match_info["id"])
        await self._run(self.store.delete_record, rid)
        self.corrupt_records.discard(rid)
        self._update_gauges()
        return json_response({"deleted": rid})

    # ------------------------------------------------------------------ directory blocks

    async def put_blocks(self, request: web.Request) -> web.Response:
        """Body: block frames (merkle.pack_frames); every block is checked against its digest
        and the put is refused whole if one does not match."""
        data = await request.read()
        try:
            items = merkle.split_frames(data)
            new = await self._run(self.blocks.put, items)  # each verified first
        except CorruptData:
            M.CS_CHECKSUM_FAIL.labels("block").inc()
            raise
        return json_response({"stored": len(items), "new": new}, status=201)

    async def put_block_deltas(self, request: web.Request) -> web.Response:
        """Body: a batch of blocks, some as deltas against blocks held here (blockdelta.pack);
        every block is rebuilt and the batch refused whole unless all match the digests it was
        sent for; 409 if a delta's base is not here. With ``X-Kubegfs-Record`` (a snapshot id),
        ``X-Kubegfs-Record-Length`` and ``X-Kubegfs-Sha256``, the body's last that many bytes
        are the snapshot's record, stored as by ``PUT /internal/records/{id}`` but in the same
        synced append as the blocks, after them (the record reaches only blocks stored before
        it); the answer's ``record`` says it was."""
        data = await request.read()
        rid = request.headers.get("X-Kubegfs-Record")
        record = b""
        if rid is not None:
            rid = record_id(rid)
            sha = request.headers.get("X-Kubegfs-Sha256", "")
            if len(sha) != 64:
                raise InvalidArgument("missing or malformed X-Kubegfs-Sha256 header")
            try:
                n = int(request.headers.get("X-Kubegfs-Record-Length", ""))
            except ValueError:
                raise InvalidArgument("missing or malformed X-Kubegfs-Record-Length header") from None
            if not 0 < n <= len(data):
                raise InvalidArgument("X-Kubegfs-Record-Length does not fit the body")
            data, record = data[:-n], data[-n:]
        def blocks(rec: LogRecord | None = None) -> tuple[int, int]:
            try:
                return self.blocks.put_delta(data, rec)
            except CorruptData:
                M.CS_CHECKSUM_FAIL.labels("block").inc()
                raise

        if rid is None:
            stored, new = await self._run(blocks)
            return json_response({"stored": stored, "new": new}, status=201)
        # one worker job: the blocks and the record after them in one synced append
        (stored, new), rec = await self._store_record(rid, [record], sha, blocks)
        return json_response({"stored": stored, "new": new, "record": rec}, status=201)

    async def get_blocks(self, request: web.Request) -> web.Response:
        """Body ``{"digests": [hex, ...]}``; answers block frames, each verified before it goes."""
        b = await read_json(request)
        raw = b.get("digests")
        if not isinstance(raw, list) or len(raw) > 100_000:
            raise InvalidArgument("digests must be a list of at most 100000 hex digests")
        try:
            digests = [bytes.fromhex(d) for d in raw if isinstance(d, str) and len(d) == 64]
        except ValueError as exc:
            raise InvalidArgument("digests must be 64 hex digits each") from exc
        if len(digests) != len(raw):
            raise InvalidArgument("digests must be 64 hex digits each")
        try:
            items = await self._run(self.blocks.get, digests)
        except KeyError as exc:
            raise NotFound(f"no such block on {self.id}: {exc.args[0]}") from exc
        except CorruptData:
            M.CS_CHECKSUM_FAIL.labels("block").inc()
            raise
        return web.Response(body=merkle.pack_frames(items, compressed=True), content_type="application/octet-stream")

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_body(self, record_digests: dict[str, list[int | str]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "cluster_id": self.membership.cluster_id,
            "address": self.advertise,
            "location": self.location.to_json(),
            "capacity_bytes": self.store.capacity_bytes(),
            "used_bytes": self.store.used_bytes(),
            "free_bytes": self.store.free_bytes(),
            "chunk_size": self.chunk_size,
            # its records in full, or what changed since the report the master took last
            **self._records.report(record_digests, full=not self._registered),
            # after a (re-)registration the master may have forgotten earlier reports: repeat all
            "corrupt": [hexh(h) for h in (self.store.corrupt if not self._registered
                                          else self.store.corrupt - self._reported_corrupt)],
            "corrupt_records": sorted(self.corrupt_records),
        }
        body["blocks_dropped"] = [d.hex() for d in self.blocks.dropped]
        if not self._registered:
            body["full"] = True
            body["chunks"] = [[hexh(h), v] for h, (v, _n) in self.store.index.items()]
            body["blocks"] = [d.hex() for d in self.blocks.digests()]
        else:
            body["added"] = [[hexh(h), v] for h, v in self._added.items()]
            body["removed"] = [hexh(h) for h in self._removed]
        return body

    async def _heartbeat_once(self) -> None:
        async with self._beat_lock:
            await self._heartbeat_locked()

    async def _heartbeat_locked(self) -> None:
        assert self._session is not None
        # the records directory is passed over (disk reads off the loop) every RECORD_SCAN_EVERY
        # heartbeats and at a registration; in between, the stores and deletes since
        self._beats += 1
        scan = not self._registered or self._beats % RECORD_SCAN_EVERY == 0
        now = await self._run(self.store.record_digests, scan)
        if scan:  # and the next RECORD_CHECK_COUNT of the log's records read and checked, in turn
            for rid in await self._run(self.blocks.check_records, RECORD_CHECK_COUNT, frozenset(self.corrupt_records)):
                self.corrupt_records.add(rid)
                M.CS_CHECKSUM_FAIL.labels("record").inc()
                log.error("record check: snapshot record %s failed its checksum", rid)
        body = self._heartbeat_body(now)
        added, removed = dict(self._added), set(self._removed)
        corrupt = set(self.store.corrupt)
        dropped = set(self.blocks.dropped)
        try:
            async with self._session.post(f"{self.master_url}/internal/heartbeat", json=body) as resp:
                reply = await _safe_json(resp)
                if resp.status != 200:
                    raise from_json(resp.status, reply)
        except ClusterMismatch as exc:
            self.membership.refused_by_master(exc.message)  # keep everything, keep asking
            self.master_ok = False
            return
        except PEER_ERRORS as exc:
            M.CS_HEARTBEAT_FAIL.inc()
            if self.master_ok:
                log.warning("heartbeat to %s failed: %s", self.master_url, exc)
            self.master_ok = False
            return
        if not self.membership.accept_reply(reply):
            self.master_ok = False
            return
        self._records.answered(body, now, reply)
        self.master_ok = True
        self._reported_corrupt |= corrupt
        self.blocks.dropped -= dropped
        if body.get("full"):
            self._registered = True
        for h in added:
            if self._added.get(h) == added[h]:
                del self._added[h]
        self._removed -= removed
        if reply.get("reregister"):
            self._registered = False
        if reply.get("chunk_size") and reply["chunk_size"] != self.chunk_size:
            log.error("master chunk size %s differs from ours %s", reply["chunk_size"], self.chunk_size)
        for hs in reply.get("delete_chunks", []):
            h = handle_hex(hs)
            await self._run(self.store.delete, h)
            self._reported_corrupt.discard(h)
            self._added.pop(h, None)
            self._removed.add(h)
        for rid in reply.get("delete_records", []):
            await self._run(self.store.delete_record, record_id(rid))
            self.corrupt_records.discard(rid)
        gone_blocks = [bytes.fromhex(d) for d in reply.get("delete_blocks", [])
                       if isinstance(d, str) and len(d) == 64]
        if gone_blocks:  # before the next heartbeat: the master waits for it before re-shipping
            await self._run(self.blocks.delete, gone_blocks)
        if reply.get("delete_chunks") or reply.get("delete_records"):
            self._update_gauges()

    async def scrub_once(self, max_chunks: int = 64) -> tuple[int, int]:
        """Verify up to ``max_chunks`` chunks (round robin), every record and every directory
        block; what fails is reported to the master with the next heartbeat, which re-replicates
        from a good copy (a dropped block is shipped again with the next snapshot to this holder)."""
        handles = sorted(self.store.index)
        if handles:
            start = self._scrub_pos % len(handles)
            batch = (handles[start:] + handles[:start])[:max_chunks]
            self._scrub_pos = start + len(batch)
        else:
            batch = []
        bad = 0
        for h in batch:
            if h in self.store.index and not await self._run(self.store.verify, h):
                bad += 1
                M.CS_CHECKSUM_FAIL.labels("chunk").inc()
                log.error("scrubber: chunk %016x failed its checksum", h)
        for rid in self.store.list_records():
            if rid not in self.corrupt_records and not await self._run(self.store.verify_record, rid):
                bad += 1
                self.corrupt_records.add(rid)
                M.CS_CHECKSUM_FAIL.labels("record").inc()
                log.error("scrubber: snapshot record %s failed its checksum", rid)
        for dg in self.blocks.digests():  # a damaged block is dropped and reported (blocks_dropped)
            try:
                await self._run(self.blocks.get, [dg], False)
            except KeyError:
                continue
            except CorruptData:
                bad += 1
                M.CS_CHECKSUM_FAIL.labels("block").inc()
        M.CS_SCRUBBED.inc(len(batch))
        return len(batch), bad

    async def _scrub_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scrub_interval * (0.8 + 0.4 * random.random()))
            try:
                _, bad = await self.scrub_once()
                if bad:
                    await self._heartbeat_once()
            except Exception:  # noqa: BLE001 - keep scrubbing
                log.exception("scrub pass failed")

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat_once()
            except Exception:  # noqa: BLE001 - keep beating
                log.exception("heartbeat failed")
            await asyncio.sleep(self.heartbeat_interval * (0.8 + 0.4 * random.random()))


async def _drain(q: asyncio.Queue[bytes | memoryview | None]) -> AsyncIterator[bytes | memoryview]:
    while (part := await q.get()) is not None:
        yield part


async def _once(parts: list[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    """A piece already received, as the parts it came in (to resend it down the chain)."""
    for p in parts:
        yield p


async def _parts(q: asyncio.Queue[bytes | memoryview | BaseException | None]) -> AsyncIterator[bytes | memoryview]:
    """A piece's parts until its end (None); a body that broke off raises what broke it."""
    while (part := await q.get()) is not None:
        if isinstance(part, BaseException):
            raise InvalidArgument(f"the piece's body broke off: {part.__class__.__name__}")
        yield part


def _quiet(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (its error was already answered another way)."""
    if not task.cancelled():
        task.exception()


async def send_body(request: web.Request, data: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Answer ``data`` with its head sent first, on its own: aiohttp (on Python < 3.12.9) joins
    a buffered head with the first body write into one new ``bytes``, which for a piece was a
    copy of all of it (~20% of a chunkserver's CPU serving reads)."""
    resp = web.StreamResponse(headers=headers)
    resp.content_length = len(data)
    writer = await resp.prepare(request)
    send_headers = getattr(writer, "send_headers", None)
    if send_headers is not None and len(data) > SMALL_ANSWER:
        send_headers()
    await resp.write(memoryview(data))  # a view: the transport keeps what it could not send yet uncopied
    await resp.write_eof()
    return resp


SMALL_ANSWER = 64 * 1024  # up to this the head and the body go in one write


def _iter_file(f: Any) -> Iterator[bytes]:
    return iter(lambda: f.read(1 << 20), b"")


async def _safe_json(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {"error": "internal", "message": (await resp.text())[:300]}


def run(
    listen: str, data_dir: Path, master_url: str, token: str | Tokens, location: Location,
    advertise: str | None = None, chunk_size: int | None = None, heartbeat_interval: float = 1.0,
    scrub_interval: float = 60.0, ssl_context: ssl.SSLContext | None = None, data_listen: str = "",
    block_cache: int = DEFAULT_BLOCK_CACHE, short_circuit: str = "",
) -> None:
    """``data_listen``: HOST:PORT of the data port (dataport.py), "" for the main port's host and
    any free port, "off" for none (a TLS chunkserver opens none: the data port is plain TCP).
    ``block_cache``: bytes of recent directory blocks kept in memory as delta bases (blockcache).
    ``short_circuit``: the Unix socket for local clients' short-circuit reads (shortcircuit.py),
    "" for ``<data>/run/short-circuit.sock``, "off" for none."""
    host, port = split_listen(listen)
    data: tuple[str, int] | None = None
    if data_listen != "off" and ssl_context is None:
        data = split_listen(data_listen) if data_listen else (host, 0)
    adv = advertise or f"{'https' if ssl_context else 'http'}://{host}:{port}"
    loc = location if location.ip else Location(location.node, location.zone, location.region, host)
    cs = Chunkserver(data_dir, master_url, token, adv, loc, chunk_size, heartbeat_interval,
                     scrub_interval=scrub_interval, data_listen=data, block_cache=block_cache,
                     short_circuit=None if short_circuit == "off" else
                     Path(short_circuit) if short_circuit else data_dir / "run" / "short-circuit.sock")
    log.info("chunkserver %s listening on %s (node=%s zone=%s region=%s)", cs.id, listen,
             loc.node, loc.zone, loc.region)
    keep_heap()
    run_app(cs.app(), host, port, ssl_context)

