"""A lean HTTP/1.1 listener for the master's hot calls: stat, ls and stat_many, and the durable
creates mkdir and create.

Per stat, ~85% of the master's time under aiohttp went to aiohttp's own per-request machinery
(a task per request, the Request and Response objects, the router, the middleware chain), not to
kubegfs. This listener is an asyncio protocol on a second port (``kubegfs master --fast-listen``)
that parses a request's head itself and answers from the callback that received it. It serves
``GET /api/v1/fs/stat``, ``GET /api/v1/fs/ls`` and ``POST /api/v1/fs/stat_many`` with the same
answers (made by the same code: ``Api.stat_of`` and friends), the same token check
(``check_auth``: ``hmac.compare_digest`` against every role's token, then the master's route
policy), the same guard, the same JSON-or-msgpack bodies and ``{"error", "message"}`` 4xx
answers, and the same request metrics; any other route is a 404 naming the main port. The main
port keeps serving these routes too, and advertises this one in an ``X-Kubegfs-Fastpath``
header on their answers, which the Python client follows (kubegfs/client.py).

``POST /api/v1/fs/mkdir`` and ``POST /api/v1/fs/create`` are served here too (``writes``: the same
``Api.mkdir_of`` and ``Api.create_of`` as on the main port, so the same op, log and durability:
answered 201 only once the op is durable here and on the metadata copies); the main port names this
listener on their answers in ``X-Kubegfs-Fastpath-Writes``. Per create from four threads, aiohttp's
request machinery was about a quarter of the master's samples, more than the create's own work or
the op log's flush (docs/benchmarks.md). Such a request waits for the disk, so it runs as a task
and the connection reads no further request until it is answered: a client sends its creates on a
connection of its own per thread, not on the stat/ls connection it shares (a 2 ms create there
would hold up every stat behind it). After that answer the connection is polled for its next
request as after any other (below).

Requests on a connection are answered in order; pipelined ones (the client's shared connection
sends several threads' requests in one write) are all answered from the one read that brought them,
and their answers go out in one write (up to a create or mkdir, whose answer waits). After
answering, a plain-TCP connection is polled for its next request for up to SPIN
(``httpconn.poll_read``: non-blocking reads, yielding the CPU between them), at most SPIN_BUDGET in
one turn of the event loop before it goes back to the loop's other work: a client that asks again
right away (a stat loop, the shared connection's next batch) is then read without the master going
to sleep in ``epoll_wait`` first. A wake-up from that sleep can cost more than the answer (on a
small virtual machine it was most of a lone thread's stat round trip, see docs/benchmarks.md); the
client polls for its answer the same way (sharedconn.SPIN). A request whose version and header
lines are byte for byte the previous one's on the connection (a client's stats differ in their
path only) takes that one's parsed headers instead of parsing them again (``_parse``); its token is
checked all the same, as every request's. A request with a body larger than
MAX_JSON_BODY, a chunked body or a malformed head is answered 4xx and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from ..auth import Policy, Tokens
from ..errors import InvalidArgument, KubegfsError, NotFound
from ..httpconn import poll_read
from ..web import (
    MAX_JSON_BODY,
    Request,
    RequestMetrics,
    answer_head,
    check_auth,
    decode_object,
    encode_body,
    msgpack_wanted,
    parse_head,
    parse_query,
)

if TYPE_CHECKING:
    from .http import Api

log = logging.getLogger("kubegfs.master.fastpath")

HEADER = "X-Kubegfs-Fastpath"  # on the main port's stat/ls/stat_many answers: this listener's port
WRITES_HEADER = "X-Kubegfs-Fastpath-Writes"  # on its mkdir/create answers: the same port
MAX_HEAD = 16 * 1024
SPIN = 100e-6  # after answering, poll the connection this long for its next request
SPIN_BUDGET = 1e-3  # at most this long polling and answering in one turn of the event loop

Route = Callable[[dict[str, str], bytes, str, bool], tuple[bytes, str]]
Deferred = Callable[[dict[str, str], bytes, str, bool], Awaitable[tuple[bytes, str]]]  # answered 201


def routes(api: Api) -> dict[tuple[str, str], Route]:
    """(method, path) -> answer(query, body, content type, msgpack?) -> (body, content type)."""

    def stat(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        return encode_body(api.stat_of(q.get("path", "")), packed)

    def ls(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        return api.ls_page(q.get("path", ""), q.get("after", ""), q.get("limit"), packed)

    def stat_many(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        return encode_body(api.stat_many_of(decode_object(body, ctype)), packed)

    return {("GET", "/api/v1/fs/stat"): stat, ("GET", "/api/v1/fs/ls"): ls,
            ("POST", "/api/v1/fs/stat_many"): stat_many}


def writes(api: Api) -> dict[tuple[str, str], Deferred]:
    """(method, path) -> the durable creates, answered once their op is durable."""

    async def mkdir(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        return encode_body(await api.mkdir_of(decode_object(body, ctype)), packed)

    async def create(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        return encode_body(await api.create_of(decode_object(body, ctype)), packed)

    return {("POST", "/api/v1/fs/mkdir"): mkdir, ("POST", "/api/v1/fs/create"): create}


class FastProtocol(asyncio.Protocol):
    def __init__(self, routes: dict[tuple[str, str], Route], tokens: Tokens, policy: Policy,
                 guard: Callable[[str, str], None], metrics: RequestMetrics, spin: float = SPIN,
                 budget: float = SPIN_BUDGET, deferred: dict[tuple[str, str], Deferred] | None = None) -> None:
        self.routes = routes
        self.deferred = deferred or {}
        self.pending: asyncio.Future[tuple[bytes, str]] | None = None  # a deferred request's answer
        self.paused = False  # reading paused until ``pending`` is answered
        self.spin = spin  # 0: never poll (a TLS listener: its bytes must go through the transport)
        self.budget = budget
        self.fd = -1  # the connection's socket, polled after answering (-1: not polled)
        self.tokens = tokens
        self.policy = policy
        self.guard = guard
        self.metrics = metrics
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.req: Request | None = None  # a head whose body is still arriving
        self.out: list[bytes] = []  # answers made during this read, written together at its end
        self.last_req: Request | None = None  # the last head parsed in whole, and its bytes from
        self.last_tail = b""  # its version on (``_parse``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if self.spin > 0 and sock is not None and transport.get_extra_info("sslcontext") is None:
            self.fd = sock.fileno()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fd = -1

    def data_received(self, data: bytes) -> None:
        self._take(data)
        if self.pending is not None:
            if len(self.buf) > MAX_HEAD + MAX_JSON_BODY and self.transport is not None and not self.paused:
                self.paused = True  # until the answer that holds them up is sent
                self.transport.pause_reading()
        elif self.fd >= 0:
            self._linger()

    def _take(self, data: bytes) -> None:
        self.buf += data
        try:
            self._serve()
        finally:
            self._flush()

    def _linger(self) -> None:
        """Read and answer what the client sends next while it comes within ``spin`` of the last
        answer, for at most ``budget`` in all (see the module docstring). The end of the stream
        or an error is left for the transport, which reads the socket again and sees it too."""
        now = time.perf_counter()
        stop = now + self.budget
        while self.transport is not None and self.pending is None and now < stop:
            try:
                more = poll_read(self.fd, min(now + self.spin, stop), 256 * 1024)
            except OSError:
                return
            if not more:
                return
            self._take(more)
            now = time.perf_counter()

    def _serve(self) -> None:
        """Answer every whole request in the buffer, up to one whose answer has to wait."""
        while self.transport is not None and self.pending is None:
            if self.req is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0 and len(self.buf) <= MAX_HEAD:
                    return
                if end < 0 or end > MAX_HEAD:
                    self._refuse(InvalidArgument("request head too large"))
                    return
                try:
                    self.req = self._parse(bytes(self.buf[:end]))
                except KubegfsError as err:
                    self._refuse(err)
                    return
                del self.buf[: end + 4]
            req = self.req
            if len(self.buf) < req.length:
                return
            body = bytes(self.buf[: req.length])
            del self.buf[: req.length]
            self.req = None
            self._answer(req, body)

    def _parse(self, head: bytes) -> Request:
        """``parse_head``, but the headers of a request whose head after its target (version and
        header lines) is byte for byte the last one's are that one's: a client's requests on one
        connection differ in their target only (a stat's path), and parsing the same headers
        again was the larger part of the head's cost. The token in them is checked again all the
        same (``_answer``)."""
        cut = head.find(b" HTTP/1.")
        if cut > 0 and self.last_req is not None and head[cut:] == self.last_tail:
            line = head[:cut].decode("latin-1").split(" ")
            if len(line) == 2 and line[1].startswith("/") and line[0]:
                last = self.last_req
                path, _, query = line[1].partition("?")
                return Request(line[0], path, query, last.headers, last.length, last.keep_alive)
        req = parse_head(head)
        self.last_req, self.last_tail = req, head[cut:] if cut > 0 else b""
        return req

    def _answer(self, req: Request, body: bytes) -> None:
        t0 = time.perf_counter()
        h = req.headers
        packed = msgpack_wanted(h.get("accept", ""), h.get("content-type", ""))
        route = self.routes.get((req.method, req.path))
        later = self.deferred.get((req.method, req.path)) if route is None else None
        try:
            check_auth(h.get("authorization", ""), req.method, req.path, self.tokens, self.policy)
            if route is None and later is None:
                raise NotFound(f"{req.method} {req.path} is served on the master's main port, not on "
                               "this one (stat, ls, stat_many, mkdir and create only)")
            self.guard(req.method, req.path)
            query = parse_query(req.query)
            if later is not None:
                self.pending = asyncio.ensure_future(later(query, body, h.get("content-type", ""), packed))
                self.pending.add_done_callback(partial(self._answer_later, req, packed, t0))
                return
            assert route is not None
            out, ctype = route(query, body, h.get("content-type", ""), packed)
            status = 200
        except Exception as exc:  # noqa: BLE001 - answered below
            status, out, ctype = self._failure(req, exc, packed)
        self._send(status, out, ctype, req.keep_alive)
        self.metrics.observe(req.path if route is not None or later is not None else "unmatched", req.method,
                             status, time.perf_counter() - t0)

    def _answer_later(self, req: Request, packed: bool, t0: float, fut: asyncio.Future[tuple[bytes, str]]) -> None:
        """A deferred request is done: its answer, then the requests that arrived meanwhile."""
        self.pending = None
        if fut.cancelled():  # the master is stopping
            if self.transport is not None:
                self.transport.close()
                self.transport = None
            return
        exc = fut.exception()
        if exc is None:
            status = 201
            out, ctype = fut.result()
        else:
            status, out, ctype = self._failure(req, exc, packed)
        if self.transport is not None:
            self._send(status, out, ctype, req.keep_alive)
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            self._take(b"")
            if self.fd >= 0 and self.pending is None:
                self._linger()  # the client's next create comes right after this answer
        self.metrics.observe(req.path, req.method, status, time.perf_counter() - t0)

    def _failure(self, req: Request, exc: BaseException, packed: bool) -> tuple[int, bytes, str]:
        """The answer to a request that raised: its error's, or a logged 500."""
        if isinstance(exc, KubegfsError):
            out, ctype = encode_body(exc.to_json(), packed)
            return exc.status, out, ctype
        log.error("unhandled error on %s %s", req.method, req.path, exc_info=exc)
        out, ctype = encode_body({"error": "internal", "message": f"internal error: {exc}"}, packed)
        return 500, out, ctype

    def _send(self, status: int, body: bytes, ctype: str, keep_alive: bool) -> None:
        assert self.transport is not None
        self.out += (answer_head(status, ctype, len(body), keep_alive), body)
        if not keep_alive:
            self._flush()
            self.transport.close()
            self.transport = None

    def _flush(self) -> None:
        """Write the answers made so far (one write, whatever their number)."""
        if self.out:
            if self.transport is not None:
                self.transport.write(b"".join(self.out))
            self.out.clear()

    def _refuse(self, err: KubegfsError) -> None:
        """A request this listener cannot read: its error, then the connection is closed."""
        body, ctype = encode_body(err.to_json(), False)
        self._send(err.status, body, ctype, keep_alive=False)
