"""The kubegfs client library (synchronous).

Data never passes through the master: the client asks it for a write lease and chunk placements
(or a file's layout), then streams bytes to and from chunkservers in pieces of at most
``PIECE`` bytes, so memory use is bounded whatever the file size. Reads fail over to the next
replica when one is down or returns a checksum error. A chunkserver whose answer named its read
port (its data port) is read there: it sends the stored block CRCs with the bytes and the client
checks every block (kubegfs/rangecrc.py); a block that fails is asked of the same replica's main
port, which checks its copy itself (and reports it to the master if it is bad), so no
unverified byte is ever returned. A chunkserver on this host that named its short-circuit
socket is read without TCP: the client gets the chunk file's descriptor and reads and checks the
blocks itself (kubegfs/localread.py), and reads that piece over TCP if anything fails there.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import logging
import os
import queue
import re
import select
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn
from urllib.parse import quote, urlencode, urlsplit

import msgpack

from . import httpconn, rangecrc, sharedconn
from . import shortcircuit as sc
from .errors import Conflict, CorruptData, KubegfsError, NoSpace, Unavailable, from_json
from .localread import LocalReads, NotLocal
from .tls import ClientTLS
from .wire import SMALL_FILE, LsPage, SnapshotInfo, Stat, StatError

MSGPACK = "application/x-msgpack"  # the master answers and reads it (kubegfs/web.py); JSON stays for curl
PIECE = 8 * 1024 * 1024  # the chunkserver takes up to 8 MiB (MAX_PIECE)
READ_AHEAD = 4  # pieces fetched ahead of the one being consumed (with client-verified reads, 4 read
# 1 GiB at 1.9-2.2 GB/s where 2 left the CPUs ~20% idle at 1.3-2.0 GB/s: docs/benchmarks.md)
Progress = Callable[[int], None]
_SOCKET_KEY, _HOST_KEY = sc.SOCKET_HEADER.lower(), sc.HOST_HEADER.lower()  # (the lean reader's header keys)
SHORT_CIRCUIT_ENV = "KUBEGFS_SHORT_CIRCUIT"  # "off" (or 0, false, no): never read through chunk file descriptors

log = logging.getLogger("kubegfs.client")


@dataclass
class ReadStats:
    failovers: int = 0
    corrupt: int = 0
    mismatches: int = 0  # client-verified pieces that failed a block CRC here
    short_circuit: int = 0  # pieces read through a local chunkserver's file descriptor
    short_circuit_fallbacks: int = 0  # pieces a short-circuit read failed for (read over TCP instead)


class _Chunk:
    """One chunk being written: the replicas that hold every piece so far, nearest first."""

    def __init__(self, cur: dict[str, Any], index: int) -> None:
        self.handle = str(cur["handle"])
        self.version = cur["version"]
        self.cur = cur
        self.index = index  # its place in the commit's chunk list
        self.live: list[dict[str, Any]] = list(cur["replicas"])
        self.errors: dict[str, KubegfsError] = {}

    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.live]

    def drop(self, rid: str, why: KubegfsError) -> None:
        """A replica that missed a piece holds none of the chunk's later ones that count."""
        self.errors.setdefault(rid, why)
        self.live = [r for r in self.live if str(r["id"]) != rid]

    def fail(self) -> NoReturn:
        why = "; ".join(f"{k}: {v.message}" for k, v in self.errors.items()) or "no replica"
        msg = f"no replica accepted chunk {self.handle}: {why}"
        if self.errors and all(isinstance(e, NoSpace) for e in self.errors.values()):
            raise NoSpace(msg)
        raise Unavailable(msg)


class _Parts:
    """A put's bytes not yet sent, held as the pieces they came in: ``take`` hands out the first
    n bytes as views of those pieces, so no byte is copied on its way to the socket. A piece the
    caller may change afterwards (anything but bytes) is copied once when it is added."""

    def __init__(self) -> None:
        self.parts: deque[memoryview] = deque()
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, piece: bytes | bytearray | memoryview) -> None:
        mv = memoryview(piece)
        if not isinstance(mv.obj, bytes):
            mv = memoryview(mv.tobytes())
        elif mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.nbytes:
            self.parts.append(mv)
            self.n += mv.nbytes

    def take(self, n: int) -> list[memoryview]:
        """The first ``n`` bytes (at most all of them), removed."""
        out: list[memoryview] = []
        while n > 0 and self.parts:
            p = self.parts[0]
            if p.nbytes <= n:
                out.append(self.parts.popleft())
            else:
                out.append(p[:n])
                self.parts[0] = p[n:]
            n -= out[-1].nbytes
            self.n -= out[-1].nbytes
        return out


class _Pipeline:
    """Sends a put's pieces down replica chains (client → first replica → next → next, each
    forwarding while it writes; see kubegfs/chunkserver/server.py) with up to WINDOW pieces in
    flight, as HDFS's DataStreamer keeps packets in flight ahead of their acknowledgements. Each
    of WINDOW threads has its own keep-alive connection; they send strictly in the put's order
    (one request at a time, under ``_send_lock``) and then wait for their answers side by side,
    so a chunkserver receives the next piece while it still writes this one and orders them by
    offset (kubegfs/chunkserver/turnstile.py). A replica that fails or misses a piece leaves
    the chunk's replica set for good; if a piece's first replica fails, the piece goes again
    to the rest of its chain (a rewrite at the same offset is idempotent). A chunk's replicas
    are those that acknowledged every piece of it, the last one synced (fdatasync before the
    answer), which ``finish`` returns once every answer is in."""

    WINDOW = 4  # pieces sent and not yet answered; memory ≈ (WINDOW + 1) × PIECE

    def __init__(self, client: Client) -> None:
        self.client = client
        self.aborted = False
        self.q: queue.Queue[tuple[_Chunk, int, list[memoryview], bool] | None] = queue.Queue()
        self.slots = threading.Semaphore(self.WINDOW)
        self._send_lock = threading.Lock()  # taken to pick the next piece, released once it is sent
        self._lock = threading.Lock()  # chunks' replica sets
        self.chunks: list[_Chunk] = []
        self.threads: list[threading.Thread] = []  # started one per piece, up to WINDOW

    def _run(self) -> None:
        try:
            while True:
                self._send_lock.acquire()
                item = self.q.get()
                if item is None:
                    self.q.put(None)  # for the next thread
                    self._send_lock.release()
                    return
                chunk, off, data, sync = item
                held = [True]

                def sent(held: list[bool] = held) -> None:
                    if held[0]:
                        held[0] = False
                        self._send_lock.release()

                try:
                    if not self.aborted:
                        self._store(chunk, off, data, sync, sent)
                except BaseException as exc:  # noqa: BLE001 - a broken piece must not hang the writer
                    with self._lock:
                        for rid in chunk.ids():
                            chunk.drop(rid, Unavailable(f"{exc.__class__.__name__}: {exc}"))
                finally:
                    sent()
                    self.slots.release()
        finally:
            self.client.close_connections()

    def _store(self, chunk: _Chunk, off: int, data: list[memoryview], sync: bool, sent: Callable[[], None]) -> None:
        with self._lock:
            chain = list(chunk.live)
        while chain:
            head, rest = chain[0], chain[1:]
            addr = str(head["address"])
            lean = self.client.data_ports.get(addr)  # the chunkserver's data port, once it named it
            try:
                reply = self.client._req(
                    "PUT", f"{lean or addr}/internal/chunks/{chunk.handle}", data=data, decode=True,
                    params={"offset": off, "version": chunk.version, "sync": "1" if sync else "0"},
                    headers={"X-Kubegfs-Chain": ",".join(str(r["address"]) for r in rest)}, on_sent=sent)
            except KubegfsError as exc:
                sent()  # a resend to the rest is not ordered with the pieces after it (the turnstile is)
                if lean is not None and isinstance(exc, Unavailable):
                    self.client.data_ports.pop(addr, None)  # its main port gets the piece (again)
                    continue
                with self._lock:
                    chunk.drop(str(head["id"]), exc)
                    chain = [r for r in rest if r in chunk.live]
                continue
            # a chunkserver that predates chains answers without "acked": it stored the piece alone
            acked = {str(i) for i in reply.get("acked") or [head["id"]]}
            with self._lock:
                for r in chain:
                    if str(r["id"]) not in acked:
                        why = (reply.get("failed") or {}).get(r["address"], "missed a piece")
                        chunk.drop(str(r["id"]), Unavailable(str(why)))
            return

    def send(self, chunk: _Chunk, offset: int, piece: list[memoryview], sync: bool) -> None:
        """Queue a piece (blocks while WINDOW pieces are unanswered); raises at once if the
        chunk has already lost every replica."""
        if not self.chunks or self.chunks[-1] is not chunk:
            self.chunks.append(chunk)
        with self._lock:
            if not chunk.live:
                chunk.fail()
        self.slots.acquire()
        if len(self.threads) < self.WINDOW:  # a one-piece put starts one thread
            t = threading.Thread(target=self._run, daemon=True, name=f"kubegfs-put-{len(self.threads)}")
            t.start()
            self.threads.append(t)
        self.q.put((chunk, offset, piece, sync))

    def finish(self) -> dict[int, list[str]]:
        """Wait for every answer; each written chunk's replicas (by its commit index), or the
        error of a chunk that kept none."""
        self.q.put(None)
        for t in self.threads:
            t.join()
        for chunk in self.chunks:
            if not chunk.live:
                chunk.fail()
        return {c.index: c.ids() for c in self.chunks}

    def close(self, abort: bool = False) -> None:
        self.aborted = self.aborted or abort
        self.q.put(None)


def _dropped(conn: Any) -> bool:
    """An idle keep-alive connection is readable only if the server closed it (or broke the
    protocol): either way it must not carry the next request."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class Client:
    def __init__(self, master: str | None = None, token: str | None = None, timeout: float = 120.0,
                 tls: ClientTLS | None = None, short_circuit: bool | None = None) -> None:
        """``short_circuit``: read chunks of chunkservers on this host through their files'
        descriptors (localread.py); None: unless ``$KUBEGFS_SHORT_CIRCUIT`` is off."""
        self.master = (master or os.environ.get("KUBEGFS_MASTER") or "http://127.0.0.1:9400").rstrip("/")
        tok = token if token is not None else os.environ.get("KUBEGFS_TOKEN", "")
        if not tok:
            raise KubegfsError("no token: pass --token or set KUBEGFS_TOKEN")
        self.token = tok
        self.timeout = timeout
        self.tls = tls or ClientTLS.from_env()  # https:// URLs are verified against its CA, always
        self._ssl: ssl.SSLContext | None = None  # made on the first https:// call (loading CAs costs ms)
        # Calls go over one keep-alive http.client connection per thread and server: requests
        # costs ~0.7 ms and urllib3 ~0.25 ms of client CPU per call, against ~0.1 ms here, and a
        # metadata-heavy client is bound by exactly that.
        self._headers = {"Authorization": f"Bearer {tok}", "Accept": MSGPACK}
        self._body_headers = {**self._headers, "Content-Type": MSGPACK}
        self._local = threading.local()
        # the master's lean listener for stat/ls/stat_many (kubegfs/master/fastpath.py), once an
        # answer has named its port; None until then, or after it could not be reached
        self._fast: str | None = None
        self._fast_off = False
        # the same listener for mkdir and create, once a mkdir or create answer named it: each
        # thread sends them on a connection of its own there (not the shared stat/ls one)
        self._fast_writes: str | None = None
        self._shared: dict[str, sharedconn.SharedConnection] = {}  # by the listener's base URL
        # chunkservers' data ports (kubegfs/chunkserver/dataport.py) as base URLs, by their main
        # base URL, as their answers named them; a put sends its pieces there
        self.data_ports: dict[str, str] = {}
        # their read ports (the same data ports), by main base URL, as their read answers named
        # them; a read there is verified here (rangecrc.py). One that could not be reached is
        # not used again by this client.
        self.read_ports: dict[str, str] = {}
        self._read_off: set[str] = set()
        if short_circuit is None:
            short_circuit = os.environ.get(SHORT_CIRCUIT_ENV, "").strip().lower() not in ("off", "0", "false", "no")
        # chunkservers on this host: their short-circuit sockets, by main base URL, as their read
        # answers named them (with this host's identity)
        self.local_sockets: dict[str, str] = {}
        self._local_reads = LocalReads(tok) if short_circuit else None
        self._host = sc.host_id() if short_circuit else ""
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubegfs-io")
        self.stats = ReadStats()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.close_connections()
        if self._local_reads is not None:
            self._local_reads.close()

    def close_connections(self) -> None:
        """Close the calling thread's connections (other threads' close when those threads end)."""
        conns: dict[tuple[str, str], Any] = getattr(self._local, "conns", {})
        for conn in conns.values():
            conn.close()
        conns.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _req(self, method: str, url: str, *, params: dict[str, Any] | None = None, json: Any = None,
             data: httpconn.Body | None = None, decode: bool = False, headers: dict[str, str] | None = None,
             on_sent: Callable[[], None] | None = None, into: bytearray | None = None,
             answer_headers: dict[str, str] | None = None, watch: httpconn.Watch | None = None) -> Any:
        """The response body of a 2xx answer (decoded from msgpack or JSON with ``decode``); any
        other answer raises its KubegfsError. ``json`` is a body to encode (as msgpack);
        ``on_sent`` is called once the whole request is sent, before its answer is read; a large
        200 body may be received into ``into``, and watched as it arrives by ``watch``
        (httpconn.Connection.response; plain http only); the answer's headers (names lowercased)
        are put in ``answer_headers``."""
        if params:
            url += "?" + _query(params)
        hdrs = self._headers
        if json is not None:
            data, hdrs = msgpack.packb(json, use_bin_type=True), self._body_headers
        if headers:
            hdrs = {**hdrs, **headers}
        try:
            status, content, ctype = self._send(method, url, data, hdrs, on_sent, into, answer_headers, watch)
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(url, exc) from exc
        return _answer(status, content, ctype, decode)

    def _shared_req(self, method: str, base: str, path: str, params: dict[str, Any] | None = None,
                    json: Any = None) -> Any:
        """A read-only call to the master's lean listener at ``base`` on the process's shared
        pipelined connection (kubegfs/sharedconn.py), asked once more on a new connection if
        that one broke (e.g. the master restarted since); an https listener is called the
        ordinary way."""
        if not base.startswith("http://"):
            return self._req(method, f"{base}/api/v1{path}", decode=True, params=params, json=json)
        target = f"/api/v1{path}?{_query(params)}" if params else f"/api/v1{path}"
        body, hdrs = (None, self._headers) if json is None else (
            msgpack.packb(json, use_bin_type=True), self._body_headers)
        conn = self._shared.get(base)
        if conn is None:
            u = urlsplit(base)
            conn = self._shared[base] = sharedconn.shared(u.hostname or "", u.port or 80, self.timeout)
        try:
            try:
                r = conn.call(method, target, body, hdrs)
            except ConnectionError:
                r = conn.call(method, target, body, hdrs)
        except OSError as exc:
            raise _unreachable(base, exc) from exc
        return _answer(r.status, r.body, r.headers.get("content-type", ""), True)


    def _send(self, method: str, url: str, body: httpconn.Body | None, headers: dict[str, str],
              on_sent: Callable[[], None] | None = None, into: bytearray | None = None,
              answer_headers: dict[str, str] | None = None,
              watch: httpconn.Watch | None = None) -> tuple[int, bytes | bytearray | memoryview, str]:
        """One request on this thread's keep-alive connection to the server, never retried (a
        create must not be sent twice): a connection the server closed while idle is noticed
        before it is reused, any other failure is the caller's error."""
        conns: dict[tuple[str, str], Any] | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        u = urlsplit(url)
        key = (u.scheme, u.netloc)
        conn = conns.get(key)
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        if conn is None:
            if u.scheme == "https":
                if self._ssl is None:
                    self._ssl = self.tls.context()
                conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=self.timeout, context=self._ssl)
            else:  # plain http: the lean connection (kubegfs/httpconn.py)
                conn = httpconn.Connection(u.hostname or "", u.port or 80, self.timeout)
            conns[key] = conn
        target = f"{u.path}?{u.query}" if u.query else u.path or "/"
        try:
            if isinstance(conn, httpconn.Connection):
                conn.send(method, target, body, headers)
                if on_sent is not None:
                    on_sent()
                r = conn.response(method, into=into, watch=watch)
                status, content, ctype, will_close = r.status, r.body, r.headers.get("content-type", ""), r.will_close
                fast = r.headers.get("x-kubegfs-fastpath")
                writes = r.headers.get("x-kubegfs-fastpath-writes")
                data_port = r.headers.get("x-kubegfs-data-port")
                if data_port is not None and data_port.isdigit():
                    self._learn_data_port(u, data_port)
                read_port = r.headers.get("x-kubegfs-read-port")
                if read_port is not None and read_port.isdigit():
                    self._learn_read_port(u, read_port)
                self._learn_local(u, r.headers.get(_SOCKET_KEY), r.headers.get(_HOST_KEY))
                if answer_headers is not None:
                    answer_headers.update(r.headers)
            else:
                if isinstance(body, list):
                    body = b"".join(body)
                conn.request(method, target, body=body, headers=headers)
                if on_sent is not None:
                    on_sent()
                hr = conn.getresponse()
                content = hr.read()
                status, ctype, will_close = hr.status, hr.headers.get("Content-Type", ""), hr.will_close
                fast = hr.headers.get("X-Kubegfs-Fastpath")
                writes = hr.headers.get("X-Kubegfs-Fastpath-Writes")
                self._learn_local(u, hr.headers.get(sc.SOCKET_HEADER), hr.headers.get(sc.HOST_HEADER))
                if answer_headers is not None:
                    answer_headers.update((k.lower(), v) for k, v in hr.headers.items())
        except BaseException:
            conn.close()
            conns.pop(key, None)
            raise
        if will_close:
            conn.close()
            conns.pop(key, None)
        if fast is not None and self._fast is None and not self._fast_off and fast.isdigit():
            self._fast = _other_port(u, u.scheme, fast)
        if writes is not None and self._fast_writes is None and not self._fast_off and writes.isdigit():
            self._fast_writes = _other_port(u, u.scheme, writes)
        return status, content, ctype

    def _learn_data_port(self, u: Any, port: str) -> None:
        base = f"{u.scheme}://{u.netloc}"
        if base not in self.data_ports and base not in self.data_ports.values():
            self.data_ports[base] = _other_port(u, "http", port)

    def _learn_read_port(self, u: Any, port: str) -> None:
        base = f"{u.scheme}://{u.netloc}"
        if u.scheme == "http" and base not in self.read_ports and base not in self._read_off:
            self.read_ports[base] = _other_port(u, "http", port)

    def _learn_local(self, u: Any, path: str | None, host: str | None) -> None:
        """A chunkserver's short-circuit socket, if its answer (these two headers) says it runs
        on this host."""
        if path and self._host and host == self._host:
            self.local_sockets.setdefault(f"{u.scheme}://{u.netloc}", path)

    def api(self, method: str, path: str, **kw: Any) -> Any:
        return self._req(method, f"{self.master}/api/v1{path}", decode=True, **kw)

    def _read_api(self, method: str, path: str, **kw: Any) -> Any:
        """A stat/ls/stat_many call: on the master's lean listener once it is known; if that
        cannot be reached, on the main port from then on (these calls change nothing, so asking
        again is safe)."""
        fast = self._fast
        if fast is not None:
            try:
                return self._shared_req(method, fast, path, **kw)
            except Unavailable:
                self._fast, self._fast_off = None, True
        return self.api(method, path, **kw)

    def _write_api(self, path: str, body: dict[str, Any]) -> Any:
        """A mkdir or create: on the master's lean listener once it is known, on this thread's
        own connection there. Never sent twice: only a connection the listener refused (so the
        request never left) goes to the main port instead, from then on."""
        fast = self._fast_writes
        if fast is not None:
            try:
                return self._req("POST", f"{fast}/api/v1{path}", decode=True, json=body)
            except Unavailable as exc:
                if not isinstance(exc.__cause__, ConnectionRefusedError):
                    raise
                self._fast_writes = None
                self._fast, self._fast_off = None, True
        return self.api("POST", path, json=body)

    # ------------------------------------------------------------------ namespace

    def status(self) -> dict[str, Any]:
        return self.api("GET", "/status")

    def chunkservers(self) -> list[dict[str, Any]]:
        return self.api("GET", "/chunkservers")["chunkservers"]

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> dict[str, Any]:
        return self._write_api("/fs/mkdir", {"path": path, "parents": parents, "mode": mode})

    def stat(self, path: str) -> Stat:
        return self._read_api("GET", "/fs/stat", params={"path": path})

    def stat_many(self, paths: list[str]) -> list[Stat | StatError]:
        """The stats of many paths in one call per 10,000, in order; a path that cannot be
        looked up comes back as ``{"path", "error", "message"}`` instead of raising."""
        out: list[Stat | StatError] = []
        for i in range(0, len(paths), 10_000):
            out += self._read_api("POST", "/fs/stat_many", json={"paths": paths[i : i + 10_000]})["stats"]
        return out

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except KubegfsError as e:
            if e.status == 404:
                return False
            raise

    def ls(self, path: str) -> list[Stat]:
        out: list[Stat] = []
        after = ""
        while True:
            page: LsPage = self._read_api("GET", "/fs/ls", params={"path": path, "after": after, "limit": 5000})
            out += page["entries"]
            nxt = page.get("next")
            if not nxt:
                return out
            after = nxt

    def rm(self, path: str, recursive: bool = False) -> dict[str, Any]:
        return self.api("POST", "/fs/rm", json={"path": path, "recursive": recursive})

    def mv(self, src: str, dst: str) -> dict[str, Any]:
        return self.api("POST", "/fs/mv", json={"src": src, "dst": dst})

    def walk(self, path: str) -> Iterator[Stat]:
        st = self.stat(path)
        yield st
        if st["type"] == "dir":
            for e in self.ls(path):
                if e["type"] == "dir":
                    yield from self.walk(e["path"])
                else:
                    yield e

    # ------------------------------------------------------------------ writes

    def put(self, path: str, data: bytes | BinaryIO | Iterable[bytes], overwrite: bool = True,
            append: bool = False, mode: int = 0o644, progress: Progress | None = None,
            retries: int = 3) -> dict[str, Any]:
        """Write a whole file (or append to one). ``data`` is bytes, a binary file object (read
        in pieces) or an iterable of byte pieces. Retries a write that a concurrent snapshot
        invalidated (only possible for bytes or seekable files)."""
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) <= SMALL_FILE and not append:
            out = self.create(path, bytes(data), overwrite=overwrite, mode=mode)
            if out.get("size") == len(data):
                if progress and len(data):
                    progress(len(data))
                return out
            # a master that predates data in creates made the file empty: write it the long way
            overwrite = True
        for attempt in range(retries + 1):
            start = _position(data)
            try:
                return self._put_once(path, data, overwrite, append, mode, progress)
            except Conflict as exc:
                retriable = "retry" in exc.message and (isinstance(data, bytes) or start is not None)
                if not retriable or attempt == retries:
                    raise
                if start is not None:
                    data.seek(start)  # type: ignore[union-attr]
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def create_empty(self, path: str, overwrite: bool = False, mode: int = 0o644) -> dict[str, Any]:
        """An empty file, in one round trip (durable when it returns)."""
        return self.create(path, b"", overwrite=overwrite, mode=mode)

    def create(self, path: str, data: bytes, overwrite: bool = False, mode: int = 0o644) -> dict[str, Any]:
        """A file of at most SMALL_FILE bytes in one round trip: the master stores ``data`` on the
        replicas (each fdatasyncs it) and commits it before answering."""
        body: dict[str, Any] = {"path": path, "overwrite": overwrite, "file_mode": mode}
        if data:
            body["data"] = data
        return self._write_api("/fs/create", body)

    def _pieces(self, data: bytes | BinaryIO | Iterable[bytes]) -> Iterator[bytes | bytearray | memoryview]:
        """``data`` in pieces of at most PIECE bytes (views of a large bytes object, not copies)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            mv = memoryview(data)
            for i in range(0, len(mv), PIECE):
                yield mv[i : i + PIECE]
        elif hasattr(data, "read"):
            while True:
                piece = data.read(PIECE)
                if not piece:
                    return
                yield piece
        else:
            for piece in data:
                if len(piece) <= PIECE:
                    yield piece
                    continue
                mv = memoryview(piece)
                for i in range(0, len(mv), PIECE):
                    yield mv[i : i + PIECE]

    def _put_once(self, path: str, data: Any, overwrite: bool, append: bool, mode: int,
                  progress: Progress | None) -> dict[str, Any]:
        how = "append" if append else ("overwrite" if overwrite else "create")
        lease = self.api("POST", "/fs/open", json={"path": path, "mode": how, "file_mode": mode, "alloc": True})
        lid = lease["lease"]
        cs = lease["chunk_size"]
        size = lease["size"]
        writer: _Pipeline | None = None
        try:
            chunks: list[dict[str, Any]] = []
            if append and size:
                layout = self.api("GET", "/fs/layout", params={"path": path})
                chunks = [{"handle": c["handle"], "replicas": []} for c in layout["chunks"]]
            cur: dict[str, Any] | None = None
            cur_off = 0
            if lease.get("last"):
                last = lease["last"]
                cur = {"handle": last["handle"], "version": last["version"], "replicas": last["replicas"]}
                cur_off = last["offset"]
                chunks[-1]["handle"] = last["handle"]  # a copy-on-write clone may have replaced it
            buf = _Parts()
            unsynced = False
            pipeline = writer = _Pipeline(self)
            chunk: _Chunk | None = None
            first: dict[str, Any] | None = lease.get("first")  # placed by the open itself

            def new_chunk() -> dict[str, Any]:
                nonlocal first
                c, first = (first, None) if first is not None else (
                    self.api("POST", "/fs/alloc", json={"lease": lid}), None)
                chunks.append({"handle": c["handle"], "replicas": []})
                return c

            def write(n: int, sync: bool) -> None:
                nonlocal cur_off, size, chunk
                assert cur is not None
                if chunk is None or chunk.cur is not cur:
                    chunk = _Chunk(cur, len(chunks) - 1)
                pipeline.send(chunk, cur_off, buf.take(n), sync)
                cur_off += n
                size += n
                if progress and n:
                    progress(n)

            for piece in self._pieces(data):
                buf.add(piece)
                while buf:
                    if cur is None or cur_off >= cs:
                        cur = new_chunk()
                        cur_off = 0
                    room = cs - cur_off
                    if len(buf) >= room:
                        write(room, True)
                        unsynced = False
                    elif len(buf) >= PIECE:
                        write(PIECE, False)
                        unsynced = True
                    else:
                        break
            if buf or unsynced:
                if cur is None or cur_off >= cs:
                    cur = new_chunk()
                    cur_off = 0
                write(len(buf), True)
            for i, ids in pipeline.finish().items():
                chunks[i]["replicas"] = ids
            return self.api("POST", "/fs/commit", json={"lease": lid, "size": size, "chunks": chunks})
        except BaseException:
            if writer is not None:
                writer.close(abort=True)
            try:
                self.api("POST", "/fs/abort", json={"lease": lid})
            except KubegfsError:
                pass
            raise

    # ------------------------------------------------------------------ reads

    def layout(self, path: str) -> dict[str, Any]:
        return self.api("GET", "/fs/layout", params={"path": path})

    def read_iter(self, path: str, progress: Progress | None = None,
                  recycle: bool = False) -> Iterator[bytes | bytearray | memoryview]:
        """The file's bytes in pieces (bytes-like: a large piece is the ``bytearray`` it was
        received into, not copied again), in order. Up to READ_AHEAD pieces are fetched ahead on the
        I/O pool, so a chunkserver reads and checksums the next piece while this one is consumed
        (memory stays bounded at (READ_AHEAD + 1) × PIECE)."""
        lay = self.layout(path)
        size, cs = lay["size"], lay["chunk_size"]
        todo = ((c, off, min(PIECE, min(cs, size - i * cs) - off))
                for i, c in enumerate(lay["chunks"]) for off in range(0, min(cs, size - i * cs), PIECE))
        inflight: deque[tuple[Future[bytes | bytearray | memoryview], bytearray | None]] = deque()
        free: list[bytearray] = []  # with ``recycle``: buffers whose pieces were consumed

        def done() -> Iterator[bytes | bytearray | memoryview]:
            f, buf = inflight.popleft()
            yield self._piece_done(f, progress)
            if buf is not None:  # the caller came back for the next piece: this one is done with
                free.append(buf)

        try:
            for c, off, n in todo:
                buf = (free.pop() if free else bytearray(PIECE)) if recycle else None
                inflight.append((self._pool.submit(self._read_piece, c, off, n, buf), buf))
                if len(inflight) > READ_AHEAD:
                    yield from done()
            while inflight:
                yield from done()
        finally:
            for f, _ in inflight:
                f.cancel()

    @staticmethod
    def _piece_done(f: Future[bytes | bytearray | memoryview],
                    progress: Progress | None) -> bytes | bytearray | memoryview:
        piece = f.result()
        if progress:
            progress(len(piece))
        return piece

    def _read_piece(self, c: dict[str, Any], off: int, n: int,
                    into: bytearray | None = None) -> bytes | bytearray | memoryview:
        errors = []
        for rep in read_order(c["replicas"], off // PIECE):
            try:
                piece = self._fetch(str(rep["address"]), c, off, n, into, str(rep["id"]))
                if len(piece) != n:
                    raise CorruptData(f"short read from {rep['id']}: {len(piece)} of {n}")
                return piece
            except KubegfsError as exc:
                if isinstance(exc, CorruptData) or exc.code == "corrupt":
                    self.stats.corrupt += 1
                self.stats.failovers += 1
                errors.append(f"{rep['id']}: {exc.message}")
        raise Unavailable(f"no replica of chunk {c['handle']} could serve it: " + "; ".join(errors or ["none live"]))

    def _fetch(self, base: str, c: dict[str, Any], off: int, n: int,
               into: bytearray | None, rid: str = "") -> bytes | bytearray | memoryview:
        """A piece from the replica at ``base``: through its chunk file's descriptor if it runs
        on this host (localread.py); else (or if that fails) from its read port, every block
        checked here, once it is known; else (or if that port cannot be reached, or a block
        fails its CRC) from its main port, which checks the blocks itself (a copy that fails
        there is reported to the master and answered as corrupt)."""
        local = self.local_sockets.get(base)
        if local is not None and self._local_reads is not None and rid:
            try:
                piece = self._local_reads.read(local, rid, int(c["handle"], 16), c["version"], off, n, into)
                self.stats.short_circuit += 1
                return piece
            except (KubegfsError, OSError, ValueError) as exc:
                self.stats.short_circuit_fallbacks += 1
                why = exc.message if isinstance(exc, KubegfsError) else repr(exc)
                log.debug("short-circuit read of chunk %s at %d from %s failed, reading over TCP: %s",
                          c["handle"], off, rid, why)
                if isinstance(exc, OSError | NotLocal):  # not reachable, or not to be trusted
                    self.local_sockets.pop(base, None)
        params = {"offset": off, "length": n, "version": c["version"]}
        lean = self.read_ports.get(base)
        if lean is not None:
            hdrs: dict[str, str] = {}
            checks: list[rangecrc.Check] = []  # the body's blocks, checked as they arrive

            def watch(headers: dict[str, str], body: memoryview) -> httpconn.Arrived:
                checks.append(_check(body, headers))
                return checks[0].arrived

            try:
                body = self._req("GET", f"{lean}/internal/chunks/{c['handle']}", params=params, into=into,
                                 headers={rangecrc.VERIFY_HEADER: "client"}, answer_headers=hdrs, watch=watch)
                if checks and checks[0].complete:
                    return _cut(memoryview(body), hdrs, off, n)
                return _checked(memoryview(body), hdrs, off, n)  # (an answer the watch did not see whole)
            except Unavailable:  # not reachable (or broke off): its main port from now on
                self.read_ports.pop(base, None)
                self._read_off.add(base)
            except CorruptData:
                self.stats.mismatches += 1
        return self._req("GET", f"{base}/internal/chunks/{c['handle']}", params=params, into=into)

    def get(self, path: str, progress: Progress | None = None) -> bytes:
        return b"".join(self.read_iter(path, progress))

    def get_to(self, path: str, out: BinaryIO, progress: Progress | None = None) -> int:
        """Write the file to ``out`` piece by piece; each piece is received into one of a few
        buffers that are reused once ``out.write`` returned (a file object copies what it is
        given), so a large read takes no fresh memory per piece."""
        n = 0
        for piece in self.read_iter(path, progress, recycle=True):
            out.write(piece)
            n += len(piece)
        return n

    # ------------------------------------------------------------------ snapshots

    def snapshot_create(self, path: str, name: str, copies: int = 2, wait: bool = True,
                        timeout: float = 600.0, **extra: Any) -> SnapshotInfo:
        body = {"path": path, "name": name, "copies": copies, **extra}
        snap = self.api("POST", "/snapshots", json=body, params={"wait": "5"} if wait else None)
        if not wait or snap["state"] == "ready":  # (the long poll's answer: ready already, no second call)
            return snap
        return self.snapshot_wait(snap["id"], timeout)

    def snapshot_wait(self, ref: str, timeout: float = 600.0) -> SnapshotInfo:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            snap = self.snapshot_show(ref)
            if snap["state"] == "ready":
                return snap
            if snap["state"] == "failed":
                raise KubegfsError(f"snapshot {snap['name']} failed: {snap.get('error')}")
            if time.monotonic() > deadline:
                raise Unavailable(f"snapshot {snap['name']} not ready after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def snapshot_list(self) -> list[SnapshotInfo]:
        return self.api("GET", "/snapshots")["snapshots"]

    def snapshot_show(self, ref: str) -> SnapshotInfo:
        return self.api("GET", f"/snapshots/{quote(ref, safe='')}")

    def snapshot_delete(self, ref: str) -> dict[str, Any]:
        return self.api("DELETE", f"/snapshots/{quote(ref, safe='')}")

    def snapshot_diff(self, ref: str, to: str | None = None) -> dict[str, Any]:
        """What changed from snapshot ``ref`` to snapshot ``to`` (None: to the live tree)."""
        return self.api("GET", f"/snapshots/{quote(ref, safe='')}/diff", params={"to": to} if to is not None else None)

    def snapshot_restore(self, ref: str, to: str | None = None, id: str | None = None) -> dict[str, Any]:
        """Restore in place (``to=None``) or to a new path. With ``id``, repeating the call
        returns the first result instead of restoring again (idempotent)."""
        body: dict[str, Any] = {} if to is None else {"to": to}
        if id is not None:
            body["id"] = id
        return self.api("POST", f"/snapshots/{quote(ref, safe='')}/restore", json=body)

    def dump(self) -> dict[str, Any]:
        return self.api("GET", "/admin/dump")

    def checkpoint(self) -> dict[str, Any]:
        return self.api("POST", "/admin/checkpoint")


def read_order(replicas: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The replicas to ask for a chunk's ``k``-th piece, in turn: those the master marked
    ``near`` (as near as the nearest) rotated by ``k``, so consecutive pieces are read from each
    of them in turn (their disks and CPUs work side by side), then the rest nearest first."""
    near = [r for r in replicas if r.get("near")]
    if len(near) < 2:
        return replicas
    i = k % len(near)
    return near[i:] + near[:i] + [r for r in replicas if not r.get("near")]


def _check(body: memoryview, headers: dict[str, str]) -> rangecrc.Check:
    """The check of a client-verified answer's blocks (rangecrc.py) from its headers;
    CorruptData if they do not say how."""
    try:
        base, size = int(headers[rangecrc.BASE_HEADER.lower()]), int(headers[rangecrc.LENGTH_HEADER.lower()])
    except (KeyError, ValueError):
        raise CorruptData("a client-verified answer without its base and chunk length") from None
    return rangecrc.Check(body, base, size, rangecrc.decode(headers.get(rangecrc.CRCS_HEADER.lower(), "")))


def _checked(body: memoryview, headers: dict[str, str], off: int, n: int) -> memoryview:
    """The ``n`` bytes at ``off`` of a client-verified answer received whole, once every block
    it carries matched its CRC; CorruptData otherwise."""
    _check(body, headers).arrived(len(body))
    return _cut(body, headers, off, n)


def _cut(body: memoryview, headers: dict[str, str], off: int, n: int) -> memoryview:
    """The ``n`` bytes at ``off`` of a client-verified answer whose blocks were checked (fewer if
    the answer ends sooner: the caller's length check catches that)."""
    base = int(headers[rangecrc.BASE_HEADER.lower()])
    if base > off:
        raise CorruptData(f"the answer starts at {base}, after {off}")
    return rangecrc.cut(body, base, off, n)


def _other_port(u: Any, scheme: str, port: str) -> str:
    """The base URL of another listener on the host of ``u`` (a parsed URL)."""
    host = u.hostname or ""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


_PLAIN = re.compile(r"[A-Za-z0-9_.~/-]*")  # what urlencode(..., safe="/") leaves as it is


def _query(params: dict[str, Any]) -> str:
    """``params`` (None values left out) as a query string; ``/`` is left as it is, so a
    path needs no escaping (nor unescaping on the master) unless it has other characters.
    The same string as ``urlencode(..., safe="/")``; a name or value that needs no escaping
    (most paths) is not run through ``quote_plus`` (urlencode was ~2 µs of a stat's client CPU)."""
    parts = []
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not _PLAIN.fullmatch(v) or not _PLAIN.fullmatch(k):
            parts.append(urlencode({k: v}, safe="/"))
        else:
            parts.append(f"{k}={v}")
    return "&".join(parts)


def _unreachable(url: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"cannot reach {url.split('/api')[0].split('/internal')[0]}: {exc.__class__.__name__}")


def _answer(status: int, content: bytes | bytearray | memoryview, ctype: str, decode: bool) -> Any:
    """A 2xx answer's body (decoded with ``decode``); any other answer raises its error."""
    if status >= 300:
        try:
            body = _decode(content, ctype)
        except ValueError:
            body = bytes(content).decode("utf-8", "replace")
        raise from_json(status, body)
    return _decode(content, ctype) if decode else content


def _decode(content: bytes | bytearray | memoryview, content_type: str) -> Any:
    if isinstance(content, memoryview):
        content = bytes(content)
    if content_type.startswith(MSGPACK):
        try:
            return msgpack.unpackb(content, raw=False, strict_map_key=True)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError(f"malformed msgpack answer: {exc}") from exc
    return jsonlib.loads(content)


def _position(data: Any) -> int | None:
    """Where a seekable file object is (so a retried write can start again), else None."""
    try:
        if hasattr(data, "seekable") and data.seekable():
            return int(data.tell())
    except (OSError, ValueError):
        pass
    return None
