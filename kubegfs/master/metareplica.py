"""Replicated metadata: the master's checkpoints and op log, copied to chunkservers in other zones.

GFS replicates the master's operation log on remote machines before answering a client; so do
we. The replicator picks ``copies`` live chunkservers, each in a zone of its own where it can
(``choose_targets``), and keeps on each a *complete* copy of the master's data directory
(``chunkserver/metastore.py``): a checkpoint and every op after it.

Each group-committed batch of the op log is sent to every in-sync target, while it is written
locally, over one persistent ordered stream per target (``_Stream``, a WebSocket to
``/internal/meta/stream``); the answers (the copy's last seq, in order) settle the batches they
cover. A stream keeps one send in flight: the batches made while the copy has not answered the
last send go out together, as one send of their records (``take_run``), once it has. In ``sync``
the op log makes its next batch only once the copies answered this one (``oplog.OpLog``), so a
batch carries every op of a round trip; in ``async`` the op log makes batches at the local
disk's pace and a stream also starts its sends ``ASYNC_SEND_INTERVAL`` apart, so one send
carries the batches of a round trip or of the interval, whichever is longer. Either way the
copies pay their per-send work (a message, a checksum, a wake-up, an fdatasync, an answer) a
few hundred times a second, not once per local batch. Where the copy's inventory names a
``stream_port`` (its data port, plain TCP) the stream is a bare connection there instead
(``_LeanLink``: length-prefixed messages, 8-byte answers read in the read callback; the copy
serves it from one thread), else the WebSocket on its main port.

Modes:
  ``sync``  the ops of a batch are acknowledged once it is durable here and every in-sync
            target has answered it: an acknowledged op is durable here and on every in-sync copy.
  ``async`` batches are sent in the background; a writer waits only when the oldest batch the
            copies have not answered is older than ``max_lag_seconds`` (the bound on what losing
            the master can cost).
  ``off``   local only.

A target that fails a batch drops out of sync (the op is still acknowledged by the others, and
the status shows the copy count short: ``MetadataReplicated`` False); the background loop brings
it back from the files on disk (plain HTTP): it appends what the copy misses when the copy
follows this log (``history``) and is not ahead of it, else resets it to the newest local
checkpoint + log; batches made meanwhile are kept for it (``_joining``) and go first on its new
stream, so each copy sees its records in order without holding back the others.

``fetch_newest`` is the way back: the newest complete copy among the chunkservers, verified
(checkpoint sha256, record CRCs and seq order) by replaying it in a staging directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import aiohttp

from .. import metrics as M
from ..errors import KubegfsError, from_json
from ..formats import frame, packb, record_digest, scan_log, sha256_hex
from ..httpconn import parse_response_head
from ..metalayout import (
    LEAN_MAX_REFUSAL,
    checkpoint_name,
    lean_message,
    pack_stream_batch,
    seq_of,
    take_lean_answers,
)
from ..topology import Location
from .oplog import OpLog, RecoveryReport, recover
from .state import MasterState

log = logging.getLogger("kubegfs.master.metareplica")

MODES = ("sync", "async", "off")
BATCH_BYTES = 4 << 20  # bootstrap sends the log in pieces of about this size
# async: a stream's sends start at least this far apart, so that one carries what the op log
# made meanwhile (at the local disk's pace) rather than a batch or two; the copies trail by it
# at most once more, against a lag bound of seconds. Clients do not wait for it.
ASYNC_SEND_INTERVAL = 0.005
_NET_ERRORS = (TimeoutError, KubegfsError, aiohttp.ClientError, OSError)


@dataclass(frozen=True)
class MetaReplicationConfig:
    mode: str = "sync"
    copies: int = 2
    max_lag_seconds: float = 5.0  # async only
    timeout_seconds: float = 10.0  # one send to one target


@dataclass(frozen=True)
class Candidate:
    id: str
    address: str
    location: Location


def choose_targets(candidates: list[Candidate], current: list[str], copies: int, master: Location) -> list[str]:
    """Up to ``copies`` chunkservers, one per zone where possible, never on the master's node
    unless nothing else is left. Current targets that are still candidates stay (a change means
    shipping a whole copy). Pure."""
    by_id = {c.id: c for c in candidates}
    chosen = [i for i in current if i in by_id][:copies]
    zones = {by_id[i].location.zone for i in chosen}
    rest = sorted((c for c in candidates if c.id not in chosen),
                  key=lambda c: (bool(master.node) and c.location.node == master.node, c.location.zone, c.id))
    for c in rest:  # new zones first
        if len(chosen) < copies and c.location.zone not in zones:
            chosen.append(c.id)
            zones.add(c.location.zone)
    for c in rest:  # then any
        if len(chosen) < copies and c.id not in chosen:
            chosen.append(c.id)
    return chosen


@dataclass(eq=False)
class _Batch:
    """One group-committed batch of the log on its way to the copies (``on_durable``'s answer,
    an ``oplog.Shipment``)."""

    data: bytes
    first: int
    last: int
    t: float
    fut: asyncio.Future[None]
    waiting: set[str] = field(default_factory=set)  # in-sync copies that have not acknowledged it
    wait: bool = True
    hooks: list[Callable[[], None]] = field(default_factory=list)

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the copies hold the batch, in the same step that settles it (a
        future's callbacks would wait for the next pass of the event loop)."""
        if self.fut.done():
            fn()
        else:
            self.hooks.append(fn)

    def resolve(self) -> None:
        if self.fut.done():
            return
        self.fut.set_result(None)
        for fn in self.hooks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - one hook must not keep the others from running
                log.exception("a hook of log batch %d..%d failed", self.first, self.last)
        self.hooks.clear()

    @cached_property
    def sha256(self) -> str:
        """Computed when it is sent alone (a batch that goes out in a run is summed with it)."""
        return sha256_hex(self.data)


def take_run(backlog: deque[_Batch], limit: int = BATCH_BYTES) -> tuple[bytes, int]:
    """Pop the batches at the front of ``backlog`` that continue each other's seqs, up to
    ``limit`` bytes of records (always the first), and make them one stream message: the copy
    takes concatenated framed records ``first..last`` as one batch. Returns (message, last seq).
    Pure but for popping ``backlog``, which must not be empty."""
    b = backlog.popleft()
    first, last, parts, n = b.first, b.last, [b.data], len(b.data)
    while backlog and backlog[0].first == last + 1 and n + len(backlog[0].data) <= limit:
        nxt = backlog.popleft()
        parts.append(nxt.data)
        n += len(nxt.data)
        last = nxt.last
    if len(parts) == 1:  # alone: its sum is shared by every copy's stream
        return pack_stream_batch(first, last, b.sha256, b.data), last
    data = b"".join(parts)
    return pack_stream_batch(first, last, sha256_hex(data), data), last


@dataclass
class Target:
    id: str
    address: str
    zone: str
    in_sync: bool = False
    last_seq: int = 0
    error: str = ""
    stream: str = ""  # how its batches go: "data-port" (``_LeanLink``) or "websocket"

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "zone": self.zone, "in_sync": self.in_sync,
                "last_seq": self.last_seq, "error": self.error, "stream": self.stream}


class _Stream:
    """The persistent, ordered channel to one copy (``/internal/meta/stream``), one send in
    flight: a batch put while the copy has not answered the last send waits, and once it has,
    everything that waited goes out as one send (``take_run``); the answers come back in order.

    A send goes to the socket at once, in the step that allows it (``put`` or the answer): the
    copy starts its write while the local one runs; a sender task would wait for the next pass
    of a busy event loop. Only a send that has to wait (the transport's flow control) is
    finished by a task (``_drain``), which then sends what it may. With an ``interval`` (async)
    a send starts no sooner than that after the previous one (a timer sends what waited)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse | _LeanLink, on_ack: Callable[[int], None],
                 on_fail: Callable[[str], None], interval: float = 0.0) -> None:
        self.ws = ws
        self.on_ack = on_ack
        self._on_fail = on_fail
        self.closed = False
        self._backlog: deque[_Batch] = deque()
        self._inflight = 0  # the last seq of the send the copy has not answered yet (0: none)
        self._interval = interval
        self._next_at = 0.0  # (loop time) the next send starts no sooner
        self._timer: asyncio.TimerHandle | None = None
        self._draining: asyncio.Task[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        if isinstance(ws, _LeanLink):
            ws.attach(self)  # its read callback answers
        else:
            self.tasks.append(asyncio.create_task(self._receive()))

    def put(self, b: _Batch) -> None:
        if self.closed:
            return
        self._backlog.append(b)
        self._send()

    def _answered(self, seq: int) -> None:
        if seq >= self._inflight:
            self._inflight = 0
            self._send()  # before the batches settle: the copy starts on the next ones sooner
        self.on_ack(seq)

    def _send(self) -> None:
        """Send what waits, if nothing is in flight, no send is being finished and the interval
        since the last one has passed (else a timer calls again once it has)."""
        if self.closed or self._inflight or self._draining is not None or not self._backlog:
            return
        if self._interval:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if now < self._next_at:
                if self._timer is None:
                    self._timer = loop.call_at(self._next_at, self._timed)
                return
            self._next_at = now + self._interval
        msg, self._inflight = take_run(self._backlog)
        coro = self.ws.send_bytes(msg)
        try:
            step = coro.send(None)
        except StopIteration:
            return  # written
        except (*_NET_ERRORS, RuntimeError) as exc:  # RuntimeError: sent on a closing socket
            # in a later step, as a sender task would: the caller may be bringing this copy in sync
            asyncio.get_running_loop().call_soon(self.on_fail, f"stream send: {exc or type(exc).__name__}")
            return
        self._draining = asyncio.create_task(self._drain(coro, step))

    async def _drain(self, coro: Coroutine[Any, Any, None], step: Any) -> None:
        """Finish a send that had to wait; then send what waits if the copy answered meanwhile."""
        try:
            while True:
                if isinstance(step, asyncio.Future):
                    await asyncio.wait([step])
                else:  # a bare yield (asyncio.sleep(0))
                    await asyncio.sleep(0)
                try:
                    step = coro.send(None)  # (a failed future raises inside the send, here)
                except StopIteration:
                    break
        except (*_NET_ERRORS, RuntimeError) as exc:
            self.on_fail(f"stream send: {exc or type(exc).__name__}")
            return
        finally:
            self._draining = None
        self._send()

    def _timed(self) -> None:
        self._timer = None
        self._send()

    async def _receive(self) -> None:
        ws = cast(aiohttp.ClientWebSocketResponse, self.ws)  # (a _LeanLink answers from its read callback)
        why = "stream closed by the copy"
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    why = f"stream: unexpected {msg.type.name} message"
                    break
                body = json.loads(msg.data)
                if isinstance(body, dict) and isinstance(body.get("last_seq"), int):
                    self._answered(body["last_seq"])
                    continue
                status = int(body.get("status", 500)) if isinstance(body, dict) else 500
                why = f"refused: {from_json(status, body)}"
                break
        except (*_NET_ERRORS, ValueError) as exc:
            why = f"stream receive: {exc or type(exc).__name__}"
        self.on_fail(why)

    def on_fail(self, why: str) -> None:
        if not self.closed:  # once: the copy drops out of sync
            self._on_fail(why)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        current = asyncio.current_task()
        for task in (*self.tasks, self._draining):  # the drain, if one runs, is not kept in tasks
            if task is not None and task is not current:
                task.cancel()
        if not self.ws.closed:
            asyncio.get_running_loop().create_task(self.ws.close())


class _LeanLink(asyncio.Protocol):
    """A stream's bare connection to a copy's data port: the answer to its head, then the
    ``metalayout`` lean framing. A send is written at once; the copy's answers go to the stream
    from the read callback (``attach``), a refusal or the end of the connection as its failure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._buf = bytearray()
        self._stream: _Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def attach(self, stream: _Stream) -> None:
        self._stream = stream
        if self.closed:
            stream.on_fail("stream closed by the copy")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self.head.done():
            end = self._buf.find(b"\r\n\r\n")
            try:
                if end < 0:
                    if len(self._buf) > 1 << 16:
                        raise ValueError("answer head too large")
                    return
                _, status, headers = parse_response_head(bytes(self._buf[:end]))
                n = int(headers.get("content-length", "0"))
                if not 0 <= n <= LEAN_MAX_REFUSAL:  # the answer to the head is an error object or empty
                    raise ValueError(f"answer body of {n} bytes (at most {LEAN_MAX_REFUSAL})")
            except (KubegfsError, ValueError) as exc:
                self.head.set_exception(OSError(f"stream head: {exc}"))
                self._close()
                return
            if len(self._buf) < end + 4 + n:
                return
            body = bytes(self._buf[end + 4:end + 4 + n])
            del self._buf[:end + 4 + n]
            self.head.set_result((status, body))
            if status != 200:
                self._close()
                return
        if self._stream is None:
            return
        try:
            seqs, refusal = take_lean_answers(self._buf)
        except ValueError as exc:
            self._fail(f"stream receive: {exc}")
            return
        for seq in seqs:
            self._stream._answered(seq)
        if refusal is not None:
            self._fail(f"refused: {from_json(int(refusal.get('status', 500)), refusal)}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.head.done():
            self.head.set_exception(OSError(f"stream closed before its answer: {exc or 'end of stream'}"))
        self._fail(f"stream receive: {exc}" if exc else "stream closed by the copy")

    def _fail(self, why: str) -> None:
        self._close()
        if self._stream is not None:
            self._stream.on_fail(why)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def send_bytes(self, msg: bytes) -> None:
        if self.closed or self.transport is None:
            raise ConnectionError("stream closed")
        self.transport.write(lean_message(msg))

    async def close(self) -> None:
        self._close()


async def connect_lean(address: str, port: int, headers: dict[str, str], history: str,
                       timeout: float) -> _LeanLink:
    """The stream on the data port ``port`` of the copy at ``address`` (http only), its head
    answered 200; the copy's error otherwise."""
    u = urlsplit(address)
    if u.scheme != "http" or not u.hostname:
        raise OSError(f"the op-log stream on a data port is plain TCP, not {address}")
    loop = asyncio.get_running_loop()
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    head = (f"POST /internal/meta/stream?history={quote(history, safe='')} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Content-Length: 0\r\n\r\n")
    link: _LeanLink | None = None
    try:
        async with asyncio.timeout(timeout):
            _, link = await loop.create_connection(_LeanLink, u.hostname, port)
            if link.transport is None:
                raise OSError("stream connection without a transport")
            link.transport.write(head.encode("latin-1"))
            status, body = await link.head
    except BaseException:
        if link is not None:
            link._close()
        raise
    if status != 200:
        link._close()
        try:
            err = json.loads(body) if body else {}
        except ValueError:
            err = {}
        raise from_json(status, err if isinstance(err, dict) else {})
    return link


class MetaReplicator:
    def __init__(self, cfg: MetaReplicationConfig, data_dir: Path, history: Callable[[], str],
                 session: Callable[[], aiohttp.ClientSession | None],
                 candidates: Callable[[], list[Candidate]], location: Location) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"metadata replication mode must be one of {', '.join(MODES)}")
        self.cfg = cfg
        self.dir = data_dir
        self.history = history
        self.session = session
        self.candidates = candidates
        self.location = location
        self.targets: dict[str, Target] = {}
        self.local_seq = 0
        self._lock = asyncio.Lock()  # bootstraps and checkpoints, one at a time
        self._queue: deque[_Batch] = deque()  # batches not yet answered, in seq order
        self._streams: dict[str, _Stream] = {}  # one per in-sync copy
        self._joining: dict[str, list[_Batch]] = {}  # batches made while a copy is being brought in sync
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()  # run a maintenance pass now
        self._gave_up = False
        self._stopped = False  # ``run`` ended: the master is stopping
        self.shipped_batches = 0
        self.bootstraps = 0

    def attach(self, oplog: OpLog) -> None:
        self.local_seq = oplog.next_seq - 1
        oplog.replicate = None if self.cfg.mode == "off" else self.on_durable

    # ------------------------------------------------------------------ the write path

    def on_durable(self, data: bytes, first: int, last: int) -> _Batch | None:
        """A batch is being written locally (called in order by the op log): stream it to every
        in-sync copy now, while it is written here. Returns the batch (``Shipment``: its future
        of reaching them, whether its waiters wait for that (sync; async only when the copies
        trail by more than the lag bound), ``then``), or None when no copy is in sync (they are
        rebuilt from the files when they come back)."""
        self.local_seq = last
        if self._stopped:  # nothing would answer a batch now
            return None
        live = [t for t in self.targets.values() if t.in_sync]
        if not self._queue and not live and not self._joining and not self._awaiting_copy():
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        b = _Batch(data, first, last, time.monotonic(), fut, {t.id for t in live})
        self._queue.append(b)
        for t in live:
            self._streams[t.id].put(b)
        for joined in self._joining.values():
            joined.append(b)
        self._settle()
        self._wake.set()
        lagging = bool(self._queue) and time.monotonic() - self._queue[0].t > self.cfg.max_lag_seconds
        b.wait = self.cfg.mode == "sync" or lagging
        return b

    def _settle(self) -> None:
        """Answer the batches, in order, that every copy they wait for has acknowledged (or
        dropped out); while no copy is in sync yet (``_awaiting_copy``) they wait."""
        while self._queue and not self._queue[0].waiting and not self._awaiting_copy():
            self._queue.popleft().resolve()

    def _acked(self, t: Target, seq: int) -> None:
        t.last_seq = max(t.last_seq, seq)
        self.shipped_batches += 1
        for b in self._queue:
            if b.last > seq:
                break
            b.waiting.discard(t.id)
        self._settle()

    async def _watch(self) -> None:
        """Enforces ``timeout_seconds``: a copy that has not answered the oldest batch within it
        drops out; with no copy in sync, waiting for one to come into sync stops after it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                b = self._queue[0]
                if time.monotonic() - b.t > self.cfg.timeout_seconds:
                    for tid in list(b.waiting):
                        self._drop(self.targets[tid], f"no answer to log batch {b.first}..{b.last} "
                                                      f"within {self.cfg.timeout_seconds:g}s")
                    if self._awaiting_copy():
                        self._gave_up = True  # degraded: stop waiting until a copy is in sync again
                        log.error("no metadata copy came into sync within %gs: acknowledging on the "
                                  "local log alone", self.cfg.timeout_seconds)
                    self._settle()
                    continue
                if self._awaiting_copy():
                    self._kick.set()  # bring a copy into sync now rather than at the next pass
                await asyncio.sleep(0.02)

    def _awaiting_copy(self) -> bool:
        """sync: no copy is in sync yet but chunkservers are there (e.g. just after a restart):
        acknowledgements wait for one to be brought in sync, for at most ``timeout_seconds``;
        after that they go out on the local log alone (the condition says Degraded) until a copy
        is in sync again."""
        return (self.cfg.mode == "sync" and not self._gave_up
                and not any(t.in_sync for t in self.targets.values()) and bool(self.candidates()))

    def _drop(self, t: Target, why: str) -> None:
        if t.in_sync:
            log.warning("metadata copy on %s out of sync: %s", t.id, why)
            M.M_META_DROPS.inc()
        t.in_sync = False
        t.error = why
        stream = self._streams.pop(t.id, None)
        if stream is not None:
            stream.close()
        for b in self._queue:
            b.waiting.discard(t.id)
        self._settle()

    async def on_checkpoint(self, seq: int) -> None:
        """A local checkpoint was written: the copies get it too (it lets them prune), once they
        have answered the log up to it."""
        if self.cfg.mode == "off":
            return
        pending = [b.fut for b in self._queue if b.first <= seq]
        if pending:  # (asyncio.wait: being cancelled here must not cancel the batches)
            await asyncio.wait(pending)
        async with self._lock:
            live = [t for t in self.targets.values() if t.in_sync and t.last_seq >= seq]
            if not live:
                return
            data = await asyncio.get_running_loop().run_in_executor(
                None, (self.dir / checkpoint_name(seq)).read_bytes)
            await asyncio.gather(*(self._put_checkpoint(t, seq, data) for t in live))

    async def _put_checkpoint(self, t: Target, seq: int, data: bytes) -> bool:
        try:
            await self._call(t, "PUT", f"/internal/meta/checkpoints/{seq}", params={"history": self.history()},
                             data=data, headers={"X-Kubegfs-Sha256": sha256_hex(data)})
            return True
        except _NET_ERRORS as exc:
            self._drop(t, f"checkpoint {seq}: {exc}")
            return False

    def _client(self) -> aiohttp.ClientSession:
        s = self.session()
        if s is None:
            raise OSError("no client session yet")
        return s

    async def _call(self, t: Target, method: str, path: str, **kw: Any) -> Any:
        async with self._client().request(method, t.address + path,
                                          timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
                                          **kw) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 300:
                raise from_json(resp.status, body)
            return body

    # ------------------------------------------------------------------ the background loop

    async def run(self) -> None:
        if self.cfg.mode == "off":
            return
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                try:
                    await self.maintain()
                except Exception:  # noqa: BLE001 - keep maintaining
                    log.exception("metadata replication pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), 1.0)
                self._kick.clear()
        finally:
            self._stopped = True
            watcher.cancel()
            for stream in self._streams.values():
                stream.close()
            self._streams.clear()
            for t in self.targets.values():
                t.in_sync = False
            while self._queue:  # shutting down: what is durable locally is answered
                self._queue.popleft().resolve()

    async def maintain(self) -> None:
        """Choose targets; bring every target that is out of sync back (under the lock)."""
        cands = {c.id: c for c in self.candidates()}
        chosen = choose_targets(list(cands.values()), list(self.targets), self.cfg.copies, self.location)
        for tid in list(self.targets):
            if tid not in chosen:
                log.info("metadata copy on %s no longer maintained", tid)
                self._drop(self.targets.pop(tid), "no longer a target")
        for tid in chosen:
            if tid not in self.targets:
                c = cands[tid]
                self.targets[tid] = Target(tid, c.address, c.location.zone)
        for t in list(self.targets.values()):
            if not t.in_sync:
                async with self._lock:
                    await self._bootstrap(t)
        self.update_gauges()

    async def _bootstrap(self, t: Target) -> None:
        """Bring ``t`` in sync: what it misses from the files (over plain HTTP), then the batches
        made meanwhile over a new stream; from then on it gets every batch as it is written."""
        loop = asyncio.get_running_loop()
        upto = self.local_seq
        history = self.history()
        joined: list[_Batch] = []
        self._joining[t.id] = joined  # from here on every new batch is kept for ``t``
        try:
            inv = await self._call(t, "GET", "/internal/meta")
            cks = sorted(self.dir.glob("checkpoint-*.ckpt"))
            base = seq_of(cks[-1]) if cks else 0
            theirs = int(inv.get("last_seq", -1))
            same = inv.get("history") == history and base <= theirs <= upto and (
                theirs == base or inv.get("last_digest") == await loop.run_in_executor(
                    None, local_digest, self.dir, theirs))
            if same:
                start = theirs  # the copy follows this log: send what it misses
            else:
                await self._call(t, "POST", "/internal/meta/reset", params={"history": history, "base": str(base)})
                if base:
                    data = await loop.run_in_executor(None, cks[-1].read_bytes)
                    if not await self._put_checkpoint(t, base, data):
                        return
                start = base
            sent = start
            deadline = time.monotonic() + self.cfg.timeout_seconds
            while sent < upto:  # the newest of these may still be on their way to the local disk
                for first, last, data in await loop.run_in_executor(None, read_batches, self.dir, sent, upto):
                    await self._call(t, "POST", "/internal/meta/log",
                                     params={"history": history, "first": str(first), "last": str(last)},
                                     data=data, headers={"X-Kubegfs-Sha256": sha256_hex(data)})
                    sent = last
                if sent < upto:
                    if time.monotonic() > deadline:
                        raise OSError(f"seq {sent + 1}..{upto} not on the local disk after "
                                      f"{self.cfg.timeout_seconds:g}s")
                    await asyncio.sleep(0.01)
            ws = await self._open_stream(t, inv.get("stream_port"), history)
        except _NET_ERRORS as exc:
            t.error = f"bootstrap: {exc}"
            return
        finally:
            del self._joining[t.id]
        # no await from here on: the batches made since ``upto`` go out first, in order
        stream = _Stream(ws, partial(self._acked, t), partial(self._drop, t),
                         ASYNC_SEND_INTERVAL if self.cfg.mode == "async" else 0.0)
        self._streams[t.id] = stream
        pending = {id(b) for b in self._queue}
        for b in joined:
            if id(b) in pending:
                b.waiting.add(t.id)
            stream.put(b)
        t.in_sync, t.last_seq, t.error = True, sent, ""
        t.stream = "data-port" if isinstance(ws, _LeanLink) else "websocket"
        self._gave_up = False
        self.bootstraps += 1
        log.info("metadata copy on %s (%s) in sync at seq %d (sent from %d)", t.id, t.zone or "no zone", sent, start)
        self._settle()

    async def _open_stream(self, t: Target, port: Any, history: str) -> aiohttp.ClientWebSocketResponse | _LeanLink:
        """The copy's data port when its inventory names one (``_LeanLink``), else (or if that
        cannot be reached) the WebSocket on its main port."""
        if isinstance(port, int) and 0 < port < 65536 and t.address.startswith("http://"):
            try:
                return await connect_lean(t.address, port, dict(self._client().headers), history,
                                          self.cfg.timeout_seconds)
            except _NET_ERRORS as exc:
                log.warning("metadata copy on %s: stream on data port %d failed (%s); using the main port",
                            t.id, port, exc)
        return await self._client().ws_connect(t.address + "/internal/meta/stream", params={"history": history},
                                               heartbeat=None, max_msg_size=1 << 20)

    # ------------------------------------------------------------------ reporting

    def in_sync(self) -> int:
        return sum(1 for t in self.targets.values() if t.in_sync)

    def lag_seconds(self) -> float:
        """How far the copies trail: the age of the oldest batch they have not all answered (0
        when every op is copied)."""
        return time.monotonic() - self._queue[0].t if self._queue else 0.0

    def status(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "copies": self.cfg.copies, "in_sync": self.in_sync(),
                "local_seq": self.local_seq, "lag_seconds": round(self.lag_seconds(), 3),
                "max_lag_seconds": self.cfg.max_lag_seconds,
                "targets": [t.status() for t in self.targets.values()]}

    def condition(self) -> dict[str, Any]:
        n = self.in_sync()
        if self.cfg.mode == "off":
            return {"type": "MetadataReplicated", "status": "False", "reason": "Off",
                    "message": "metadata replication is off: losing the master's volume loses all but snapshots"}
        ok = n >= self.cfg.copies
        zones = sorted({t.zone for t in self.targets.values() if t.in_sync})
        return {"type": "MetadataReplicated", "status": "True" if ok else "False",
                "reason": "InSync" if ok else "Degraded",
                "message": f"{n} of {self.cfg.copies} copies in sync ({self.cfg.mode}; zones {', '.join(zones) or '-'})"}

    def update_gauges(self) -> None:
        M.M_META_IN_SYNC.set(self.in_sync())
        M.M_META_LAG.set(self.lag_seconds())


def local_digest(data_dir: Path, seq: int) -> str:
    """``record_digest`` of the local log's record ``seq`` ("" if it is not there): a copy whose
    last record differs took one this master never made durable (a crash) and is reset."""
    for seg in sorted(data_dir.glob("log-*.wal")):
        for rec in scan_log(seg.read_bytes(), padded=True).records:
            if isinstance(rec, dict) and rec.get("seq") == seq:
                return record_digest(rec)
    return ""


def read_batches(data_dir: Path, after: int, upto: int) -> list[tuple[int, int, bytes]]:
    """The local log's records ``after < seq <= upto``, re-framed in batches (blocking). The
    newest batches may still be on their way to the disk: the list can end early. The open
    segment is written over zeros (``oplog``): its records end where their framing says, and
    the zeros after them are never sent."""
    out: list[tuple[int, int, bytes]] = []
    buf: list[bytes] = []
    first = n = 0
    last = after
    for seg in sorted(data_dir.glob("log-*.wal")):
        for rec in scan_log(seg.read_bytes(), padded=True).records:
            seq = rec.get("seq") if isinstance(rec, dict) else None
            if not isinstance(seq, int) or seq <= last or seq > upto:
                continue
            if seq != last + 1:
                raise OSError(f"local log has a gap before seq {seq}")
            if not buf:
                first = seq
            buf.append(frame(packb(rec)))
            n += len(buf[-1])
            last = seq
            if n >= BATCH_BYTES:
                out.append((first, last, b"".join(buf)))
                buf, n = [], 0
    if buf:
        out.append((first, last, b"".join(buf)))
    return out


# ---------------------------------------------------------------------- recovery from the copies


@dataclass
class MetaCopy:
    """A verified copy: staged files and the state they replay to."""

    address: str
    history: str
    stage: Path
    state: MasterState
    report: RecoveryReport
    problems: list[str] = field(default_factory=list)

    def move_into(self, data_dir: Path) -> None:
        from ..fsutil import fsync_dir

        for p in self.stage.iterdir():
            p.rename(data_dir / p.name)
        fsync_dir(data_dir)
        self.stage.rmdir()


async def fetch_newest(session: aiohttp.ClientSession, addresses: list[str], data_dir: Path,
                       problems: list[str]) -> MetaCopy | None:
    """The newest copy that replays completely (fewer problems beat more ops only never)."""
    for old in data_dir.glob("recover-staging-*"):  # left by a recovery that was killed
        shutil.rmtree(old, ignore_errors=True)
    invs: list[tuple[int, str, dict[str, Any]]] = []
    for addr in addresses:
        try:
            async with session.get(f"{addr}/internal/meta") as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise from_json(resp.status, body)
            if body.get("history") and (body.get("checkpoints") or body.get("base") == 0) and body.get("segments"):
                invs.append((int(body["last_seq"]), addr, body))
        except _NET_ERRORS as exc:
            problems.append(f"metadata copy on {addr} unreadable: {exc}")
    loop = asyncio.get_running_loop()
    for last_seq, addr, inv in sorted(invs, key=lambda x: -x[0]):
        stage = data_dir / f"recover-staging-{time.time_ns()}"
        stage.mkdir()
        try:
            for ck in inv["checkpoints"][-1:]:
                data = await _get_bytes(session, f"{addr}/internal/meta/checkpoints/{ck['seq']}")
                if sha256_hex(data) != ck["sha256"]:
                    raise KubegfsError(f"checkpoint {ck['seq']} fails its sha256")
                await loop.run_in_executor(None, (stage / checkpoint_name(ck["seq"])).write_bytes, data)
            log_bytes = await _get_bytes(session, f"{addr}/internal/meta/log")
            first = inv["segments"][0]["first"]
            await loop.run_in_executor(None, (stage / f"log-{first:020d}.wal").write_bytes, log_bytes)
            state, rep = await loop.run_in_executor(None, recover, stage, 0, 0)
            if rep.problems or state.seq != last_seq:
                raise KubegfsError(f"replays to seq {state.seq} of {last_seq}: {'; '.join(rep.problems)}")
            return MetaCopy(addr, str(inv["history"]), stage, state, rep)
        except (*_NET_ERRORS, ValueError) as exc:
            problems.append(f"metadata copy on {addr} incomplete: {exc}")
            shutil.rmtree(stage, ignore_errors=True)
    return None


async def _get_bytes(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        if resp.status != 200:
            raise from_json(resp.status, await resp.json(content_type=None))
        return await resp.read()
