"""The chunkserver's lean data listener: a second port for a piece's PUT and a
client-verified GET.

Under aiohttp a written piece paid for the request machinery and, per part, for its body
reader joining what it had buffered into one more copy (~10% of a chunkserver's CPU in a
1 GiB put) and for the client session that forwarded it. This listener reads each request's
head itself and receives the body straight into a reused piece buffer (``sock_recv_into``);
each part that arrives is a view of that buffer, handed to the same code the main port runs
(``Chunkserver.accept_piece``: checksummed and written in STREAM_BATCH slices, forwarded down
the chain as it arrives, fdatasync of a synced piece before the answer). Forwarding goes to the
next replica's data port too (``PeerLinks``), sending the views without copying them.

It serves ``PUT /internal/chunks/{h}?offset=&version=&sync=`` with the main port's headers
(``Authorization``, ``X-Kubegfs-Chain``, ``X-Kubegfs-Cluster``, a ``Content-Length``), the same
token check (``check_auth``: ``hmac.compare_digest`` against every role's token, then the
chunkserver's route policy), the same cluster check and the same JSON answers; anything else is
a 4xx JSON answer, after which the connection is closed. The main port keeps serving every
route and names this port in an ``X-Kubegfs-Data-Port`` header on its piece answers; clients and
chunkservers that saw it send later pieces here (kubegfs/client.py, ``Chunkserver._forward``),
and go back to the main port if this one cannot be reached.

It also serves ``GET /internal/chunks/{h}?offset=&length=&version=`` with ``X-Kubegfs-Verify:
client`` (and the same token and cluster checks), HDFS's way: the whole blocks covering the
range go from the chunk file to the socket with ``sendfile`` (no copy into the process, no CRC
pass here), with their stored CRCs in the answer's head, and the client checks every block
(kubegfs/rangecrc.py). The refusals are the main port's: a stale version (409), an offset past
the chunk (400), no such chunk (404), a file shorter than its metadata (502, reported to the
master). The main port names this port in ``X-Kubegfs-Read-Port`` on its read answers; a GET
without the header is refused (400): the main port's read, verified here, is the one for curl.

It also serves the master's op-log stream to this chunkserver's metadata copy, ``POST
/internal/meta/stream?history=`` (the same token and cluster checks, no body): answered 200, the
connection then belongs to a thread of its own (``metaapi.serve_lean_stream``) until it ends.

Plain TCP only: a chunkserver that serves TLS does not open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .. import metrics as M
from ..auth import chunkserver_policy
from ..errors import InvalidArgument, KubegfsError, NotFound, PayloadTooLarge, from_json
from ..httpconn import encode_head, parse_response_head
from ..rangecrc import BASE_HEADER, CRCS_HEADER, LENGTH_HEADER, VERIFY_HEADER, encode
from ..web import (
    CHAIN_HEADER,
    CLUSTER_HEADER,
    RequestMetrics,
    answer_head,
    check_auth,
    handle_hex,
    int_param,
    parse_chain,
    parse_head,
    parse_query,
)
from .metaapi import check_history

log = logging.getLogger("kubegfs.chunkserver.dataport")

DATA_PORT_HEADER = "X-Kubegfs-Data-Port"
MAX_HEAD = 16 * 1024
HEAD_RECV = 64 * 1024
POOLED = 8  # piece buffers kept for reuse (a window of pieces in flight, both directions)
ROUTE = "/internal/chunks/{h} (data port)"  # the request metrics' route label
PART = 256 * 1024  # a piece's body is handed on in parts of at least this (server.py's STREAM_BATCH)
PEER_TIMEOUT = 60.0  # a forwarded piece's whole exchange, as the main port's peer session
HEAD_TIMEOUT = 75.0  # a connection sends its next request's whole head within this (aiohttp's keep-alive)

# (h, offset, version, sync, chain, length, body parts) -> the answer's JSON object
AcceptPiece = Callable[[int, int, int, bool, list[str], int, AsyncIterator[memoryview]], Awaitable[dict[str, Any]]]
# (h, offset, length, min version) -> the chunk file opened and the blocks to send (store.ReadRange)
OpenRead = Callable[[int, int, int, int], Awaitable[Any]]
# (socket, history, bytes that came after the head) -> serves the op-log stream, blocking
MetaStream = Callable[[socket.socket, str, bytes], None]
META_STREAM_PATH = "/internal/meta/stream"


class BufferPool:
    """Piece-sized buffers reused across pieces: a fresh 8 MiB buffer per piece is zeroed and its
    pages faulted in again."""

    def __init__(self, size: int, keep: int = POOLED) -> None:
        self.size = size
        self.keep = keep
        self.free: list[bytearray] = []

    def take(self) -> bytearray:
        return self.free.pop() if self.free else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        if len(self.free) < self.keep:
            self.free.append(buf)


async def read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket, buf: bytearray) -> bytes | None:
    """The next head (up to, not including, its blank line) from ``sock``, ``buf`` holding what
    came after it; None at a clean end of the connection between requests."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise InvalidArgument("request head too large")
        data = await loop.sock_recv(sock, HEAD_RECV)
        if not data:
            if buf:
                raise ConnectionError("the connection closed inside a head")
            return None
        buf += data
    if end > MAX_HEAD:
        raise InvalidArgument("request head too large")
    head = bytes(buf[:end])
    del buf[: end + 4]
    return head


async def receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview,
                  early: bytearray, part: int = PART) -> AsyncIterator[memoryview]:
    """Fill ``view`` (a body of exactly its length) from ``early`` (bytes that came with the
    head, taken out of it) and then ``sock``, yielding it in views of at least ``part`` bytes
    (the last may be shorter): each is one disk write and one send down the chain, whatever
    the sizes the socket hands out."""
    have = min(len(early), len(view))
    if have:
        view[:have] = early[:have]
        del early[:have]
    n = len(view)
    start = 0
    while have < n:
        if have - start >= part:
            yield view[start:have]
            start = have
        k = await loop.sock_recv_into(sock, view[have:])
        if not k:
            raise ConnectionError("the connection closed inside a piece's body")
        have += k
    if have > start:
        yield view[start:have]


def answer(status: int, body: Any, keep_alive: bool, port: int | None) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    extra = f"{DATA_PORT_HEADER}: {port}\r\n" if port else ""
    return answer_head(status, "application/json", len(raw), keep_alive, extra) + raw


class DataListener:
    def __init__(self, accept: AcceptPiece, tokens: Any, check_cluster: Callable[[str], None],
                 chunk_size: int, pool: BufferPool, open_read: OpenRead,
                 meta_stream: MetaStream | None = None) -> None:
        self.accept = accept
        self.open_read = open_read
        self.meta_stream = meta_stream
        self.tokens = tokens
        self.check_cluster = check_cluster
        self.chunk_size = chunk_size
        self.pool = pool
        self.port: int | None = None
        self.metrics = RequestMetrics(M.CS_HTTP)
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); the port it got."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
        s.setblocking(False)
        self._sock = s
        self.port = int(s.getsockname()[1])
        self._spawn(self._accept_loop(s))
        return self.port

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, s: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(s)
            except OSError:
                if self._sock is None:
                    return
                await asyncio.sleep(0.1)  # e.g. out of file descriptors: try again
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve(conn))

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            while True:
                try:
                    try:  # an idle or trickling connection is not held forever (nothing authenticated it yet)
                        async with asyncio.timeout(HEAD_TIMEOUT):
                            head = await read_head(loop, sock, buf)
                    except TimeoutError:
                        return
                    if head is None:
                        return
                    req = parse_head(head)
                except KubegfsError as err:
                    await loop.sock_sendall(sock, answer(err.status, err.to_json(), False, self.port))
                    return
                t0 = time.perf_counter()
                if req.method == "POST" and req.path == META_STREAM_PATH:
                    await self._meta(loop, sock, req, buf, t0)
                    return
                if req.method == "GET":
                    status, keep = await self._read(loop, sock, req)
                else:
                    status, body, whole = await self._piece(loop, sock, req, buf)
                    keep = whole and req.keep_alive
                    await loop.sock_sendall(sock, answer(status, body, keep, self.port))
                self.metrics.observe(ROUTE if status != 404 else "unmatched", req.method, status,
                                     time.perf_counter() - t0)
                if not keep:
                    return
        except (OSError, asyncio.CancelledError):
            return
        finally:
            sock.close()

    async def _meta(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, req: Any, early: bytearray,
                    t0: float) -> None:
        """The op-log stream: checked and answered here, then served by a thread of its own
        (which owns the socket) until it ends."""
        h = req.headers
        try:
            check_auth(h.get("authorization", ""), req.method, req.path, self.tokens, chunkserver_policy)
            self.check_cluster(h.get(CLUSTER_HEADER.lower(), ""))
            if self.meta_stream is None:
                raise NotFound("this chunkserver serves the op-log stream on its main port only")
            history = check_history(parse_query(req.query).get("history", ""))
            if req.length:
                raise InvalidArgument("the op-log stream's head has no body")
        except KubegfsError as err:
            self.metrics.observe(META_STREAM_PATH, req.method, err.status, time.perf_counter() - t0)
            await loop.sock_sendall(sock, answer(err.status, err.to_json(), False, self.port))
            return
        self.metrics.observe(META_STREAM_PATH, req.method, 200, time.perf_counter() - t0)
        await loop.sock_sendall(sock, answer_head(200, "application/octet-stream", 0, True))
        done: asyncio.Future[None] = loop.create_future()
        serve, rest = self.meta_stream, bytes(early)

        def ended() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                serve(sock, history, rest)
            except Exception:  # noqa: BLE001 - a thread's failure is logged, the stream ends
                log.exception("op-log stream failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(ended)

        threading.Thread(target=run, name="meta-stream", daemon=True).start()
        try:
            await asyncio.shield(done)  # the thread owns the socket until it returns
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its recv returns at once
            await asyncio.wait([done], timeout=5)
            raise

    async def _read(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, req: Any) -> tuple[int, bool]:
        """A client-verified GET, answered (see the module docstring): (status, whether the
        connection may go on)."""
        h = req.headers
        keep = req.keep_alive and req.length == 0
        try:
            check_auth(h.get("authorization", ""), req.method, req.path, self.tokens, chunkserver_policy)
            parts = req.path.split("/")
            if len(parts) != 4 or parts[:3] != ["", "internal", "chunks"]:
                raise NotFound(f"GET {req.path} is served on the chunkserver's main port, not on its data port")
            self.check_cluster(h.get(CLUSTER_HEADER.lower(), ""))
            if req.length:
                raise InvalidArgument("a GET has no body")
            if h.get(VERIFY_HEADER.lower(), "") != "client":
                raise InvalidArgument(f"a read on the data port is verified by the client: send {VERIFY_HEADER}: "
                                      "client, or read on the main port")
            handle = handle_hex(parts[3])
            q = parse_query(req.query)
            offset = int_param(q, "offset", 0, 0, self.chunk_size)
            length = int_param(q, "length", self.pool.size, 0, self.pool.size)
            version = int_param(q, "version", 0, 0)
            rr = await self.open_read(handle, offset, length, version)
        except KubegfsError as err:
            await loop.sock_sendall(sock, answer(err.status, err.to_json(), keep, self.port))
            return err.status, keep
        extra = (f"{BASE_HEADER}: {rr.base}\r\n{CRCS_HEADER}: {encode(rr.crcs)}\r\n"
                 f"{LENGTH_HEADER}: {rr.size}\r\nX-Kubegfs-Version: {rr.version}\r\n")
        head = answer_head(200, "application/octet-stream", rr.length, keep, extra)
        try:
            sent = loop.run_in_executor(None, send_range, sock, head, rr.fd, rr.base, rr.length, PEER_TIMEOUT)
        except BaseException:
            os.close(rr.fd)
            raise
        try:
            await asyncio.shield(sent)  # the thread owns the socket until it returns
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # its next send fails at once
            await asyncio.wait([sent])
            raise
        return 200, keep

    async def _piece(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, req: Any,
                     early: bytearray) -> tuple[int, Any, bool]:
        """(status, JSON answer, whether the body was read whole so the connection may go on)."""
        h = req.headers
        try:
            check_auth(h.get("authorization", ""), req.method, req.path, self.tokens, chunkserver_policy)
            parts = req.path.split("/")
            if req.method != "PUT" or len(parts) != 4 or parts[:3] != ["", "internal", "chunks"]:
                raise NotFound(f"{req.method} {req.path} is served on the chunkserver's main port, not on "
                               "its data port (a piece's PUT only)")
            self.check_cluster(h.get(CLUSTER_HEADER.lower(), ""))
            if req.length > self.pool.size:
                raise PayloadTooLarge(f"piece larger than {self.pool.size} bytes")
            handle = handle_hex(parts[3])
            q = parse_query(req.query)
            offset = int_param(q, "offset", 0, 0, self.chunk_size)
            version = int_param(q, "version", None, 1)
            sync = q.get("sync", "1") != "0"
            chain = parse_chain(h.get(CHAIN_HEADER.lower(), ""))
        except KubegfsError as err:
            return err.status, err.to_json(), req.length == 0
        buf = self.pool.take()
        ok = False
        try:
            body = receive(loop, sock, memoryview(buf)[: req.length], early)
            reply = await self.accept(handle, offset, version, sync, chain, req.length, body)
            ok = True
            return 200, reply, True
        except KubegfsError as err:
            return err.status, err.to_json(), False
        except ConnectionError:
            raise  # the caller went away: no one to answer
        except Exception as exc:  # noqa: BLE001 - answer JSON, log the trace
            log.exception("unhandled error on a piece's PUT")
            return 500, {"error": "internal", "message": f"internal error: {exc}"}, False
        finally:
            if ok:  # otherwise a worker thread may still be writing from it
                self.pool.give(buf)


class PeerLinks:
    """Keep-alive connections to other chunkservers' data ports, and their ports as learned from
    their answers (by base URL)."""

    def __init__(self, token: str, cluster_id: Callable[[], str]) -> None:
        self.token = token
        self.cluster_id = cluster_id
        self.ports: dict[str, int] = {}
        self.idle: dict[tuple[str, int], list[socket.socket]] = {}

    def learn(self, base: str, port: str | None) -> None:
        if port is not None and port.isdigit() and base.startswith("http://"):
            self.ports[base] = int(port)

    def forget(self, base: str) -> None:
        self.ports.pop(base, None)

    async def _connect(self, host: str, port: int) -> socket.socket:
        idle = self.idle.get((host, port), [])
        while idle:
            s = idle.pop()
            if not _readable(s):  # an idle connection the peer closed is readable (EOF)
                return s
            s.close()
        loop = asyncio.get_running_loop()
        info = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        fam, typ, proto, _, addr = info[0]
        s = socket.socket(fam, typ, proto)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, addr), 5)
        except BaseException:
            s.close()
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    async def forward(self, base: str, host: str, target: str, rest: list[str], length: int,
                      body: AsyncIterator[Any]) -> dict[str, Any]:
        """PUT a piece (``length`` bytes arriving as ``body``) to ``base``'s data port; its answer.
        ConnectionRefusedError before anything was sent means the data port is not there (the
        caller then uses the main port with the same, still unread, ``body``)."""
        port = self.ports[base]
        sock = await self._connect(host, port)
        loop = asyncio.get_running_loop()
        keep = False
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                headers = {"Authorization": f"Bearer {self.token}", CHAIN_HEADER: ",".join(rest)}
                if cid := self.cluster_id():
                    headers[CLUSTER_HEADER] = cid
                await loop.sock_sendall(sock, encode_head(f"{host}:{port}", "PUT", target, length, headers))
                async for part in body:
                    await loop.sock_sendall(sock, part)
                buf = bytearray()
                head = await read_head(loop, sock, buf)
                if head is None:
                    raise ConnectionError(f"{base} closed the connection before answering")
                _, status, hdrs = parse_response_head(head)
                n = int(hdrs.get("content-length", "0"))
                while len(buf) < n:
                    data = await loop.sock_recv(sock, n - len(buf))
                    if not data:
                        raise ConnectionError(f"{base} closed the connection inside its answer")
                    buf += data
                keep = hdrs.get("connection", "").lower() != "close" and len(buf) == n
            try:
                reply = json.loads(bytes(buf))
            except ValueError:
                reply = {"error": "internal", "message": bytes(buf[:300]).decode("latin-1")}
            if status != 200:
                raise from_json(status, reply)
            if not isinstance(reply, dict):
                raise InvalidArgument(f"{base} answered a piece with {str(reply)[:100]}")
            return reply
        finally:
            if keep:
                self.idle.setdefault((host, port), []).append(sock)
            else:
                sock.close()

    def close(self) -> None:
        for socks in self.idle.values():
            for s in socks:
                s.close()
        self.idle.clear()


def send_range(sock: socket.socket, head: bytes, fd: int, offset: int, count: int, timeout: float) -> None:
    """In a worker thread: ``head``, then ``count`` bytes of the file ``fd`` from ``offset``
    with ``sendfile`` (page cache to socket, never through this process), on the event loop's
    non-blocking socket, waiting in ``poll`` while it is full (at most ``timeout`` seconds at a
    time); closes ``fd``. A file that ends early (truncated meanwhile) is a ConnectionError: the
    answer cannot be completed and the caller closes the connection."""
    try:
        out = sock.fileno()
        p = select.poll()
        p.register(out, select.POLLOUT)

        def room() -> None:
            if not p.poll(timeout * 1000):
                raise TimeoutError("the reader took no bytes")

        view = memoryview(head)
        while view:
            try:
                view = view[sock.send(view, socket.MSG_MORE if count else 0):]  # the head leaves with the first bytes
            except BlockingIOError:
                room()
        while count:
            try:
                n = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                room()
                continue
            if n == 0:
                raise ConnectionError("the chunk file ended before the range did")
            offset += n
            count -= n
    finally:
        os.close(fd)


def _readable(s: socket.socket) -> bool:
    try:
        return bool(select.select([s], [], [], 0)[0])
    except (OSError, ValueError):
        return True
