"""A minimal keep-alive HTTP/1.1 client connection for the client library's plain-http calls.

``http.client`` parses every answer's headers with the ``email`` package, which was the larger
part of a metadata call's client-side CPU; kubegfs servers answer with a status line, a few
headers and a ``Content-Length`` (or a chunked body), and this reads exactly that. Requests are
never retried: one request, then its whole answer (``request``, or ``send`` then ``response``
for a caller that does something between the two); ``send_raw`` sends several at once, whose
answers ``response`` then reads in order (kubegfs/sharedconn.py).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

Body = bytes | bytearray | memoryview | list[memoryview]  # a request body, whole or in parts

MAX_HEAD = 64 * 1024  # status line + headers
SMALL_BODY = 64 * 1024  # bodies up to this go out in the same send as the head
RECV = 32 * 1024  # a metadata answer in one recv; a big body is read straight into its buffer
WAITALL = 1024 * 1024  # a body at least this large is received by blocking receives (``recv_body``)
SLICE = 256 * 1024  # at most this much per receive of a big body: a watcher checks it while it is in cache
RCVBUF = 4 * 1024 * 1024  # the receive buffer a connection asks for once it receives a big body

Arrived = Callable[[int], None]  # told how many bytes of a body are in (``Connection.response``'s watch)
Watch = Callable[[dict[str, str], memoryview], Arrived]


def encode_head(host_header: str, method: str, target: str, length: int, headers: dict[str, str]) -> bytes:
    """A request's line and headers, ``Host`` and ``Content-Length`` included."""
    return head_with(head_fields(host_header, headers), method, target, length)


def head_fields(host_header: str, headers: dict[str, str]) -> bytes:
    """The part of a request head that follows its request line, up to its Content-Length's value:
    the same for every request with these headers, so a caller may encode it once (``head_with``)."""
    lines = [f"Host: {host_header}", *(f"{k}: {v}" for k, v in headers.items()), "Content-Length: "]
    return ("\r\n" + "\r\n".join(lines)).encode("latin-1")


def head_with(fields: bytes, method: str, target: str, length: int) -> bytes:
    """A request head from its ``head_fields``."""
    return b"%s %s HTTP/1.1%s%d\r\n\r\n" % (method.encode("latin-1"), target.encode("latin-1"), fields, length)


class BadResponse(ConnectionError):
    """The server's answer was not HTTP/1.1 we can read (the connection is then dropped)."""


def parse_response_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """A response's HTTP version, status and headers (names lowercased) from its head (without
    the blank line); BadResponse if malformed."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"bad status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadResponse(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], int(parts[1]), headers


class Response:
    __slots__ = ("status", "headers", "body", "will_close")

    def __init__(self, status: int, headers: dict[str, str], body: bytes | bytearray | memoryview,
                 will_close: bool) -> None:
        self.status = status
        self.headers = headers  # names lowercased
        self.body = body
        self.will_close = will_close


class Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.sock: socket.socket | None = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        # the same timeout in the kernel, for the blocking receives of big bodies (``recv_body``)
        set_recv_timeout(self.sock, timeout)
        self._buf = bytearray()
        self._widened = False  # asked for a receive buffer of RCVBUF (``_widen``)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> Response:
        self.send(method, target, body, headers)
        return self.response(method)

    def send_raw(self, data: bytes) -> None:
        """Bytes that are already whole requests (a pipelined batch: ``response`` once each)."""
        if self.sock is None:
            raise ConnectionError("connection closed")
        send_all(self.sock, data)

    def send(self, method: str, target: str, body: Body | None, headers: dict[str, str]) -> None:
        """Send a whole request; ``response`` then reads its answer (one request at a time). A
        body given as parts is sent part by part, not joined."""
        sock = self.sock
        if sock is None:
            raise ConnectionError("connection closed")
        parts = [] if body is None else body if isinstance(body, list) else [body]
        length = sum(memoryview(p).nbytes for p in parts)
        head = encode_head(self.host_header, method, target, length, headers)
        if length > SMALL_BODY:
            sock.sendall(head)
            for p in parts:
                sock.sendall(p)
        else:
            send_all(sock, b"".join([head, *parts]))

    # ------------------------------------------------------------------ reading

    def _fill(self, spin: float = 0.0) -> None:
        """Receive what has arrived (at least a byte). With ``spin``, poll for up to that many
        seconds before sleeping in ``recv`` (yielding the CPU between polls to any thread that
        is ready to run)."""
        assert self.sock is not None
        data = _poll(self.sock, spin) if spin else None
        if data is None:
            data = self.sock.recv(RECV)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf += data

    def _line_block(self, spin: float = 0.0) -> bytes:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise BadResponse("response head too large")
            self._fill(spin)
            spin = 0.0
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        return head

    def response(self, method: str, spin: float = 0.0, into: bytearray | None = None,
                 watch: Watch | None = None) -> Response:
        """The next answer. ``spin``: how long to poll for its first bytes before sleeping in
        ``recv`` (see ``_poll``). ``into``: a buffer for a large ``Content-Length`` body, which is
        then received into it and answered as a view of it (no new buffer per answer).
        ``watch``: for a 200 ``Content-Length`` body, called with the answer's headers and the
        body's buffer before it is received; what it returns is called with how many bytes of the
        body are in after each slice of at most SLICE bytes (a check of the bytes while they are
        still in the CPU's cache; what it raises ends the call, and the connection is then
        unusable)."""
        version, status, headers = parse_response_head(self._line_block(spin))
        will_close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        body: bytes | bytearray | memoryview
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked()
        elif "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError as exc:
                raise BadResponse("bad Content-Length") from exc
            body = self._exactly(n, into if status == 200 else None,
                                 (lambda view: watch(headers, view)) if watch is not None and status == 200 else None)
        else:  # delimited by the close
            will_close = True
            body = self._until_close()
        return Response(status, headers, body, will_close)

    def _exactly(self, n: int, into: bytearray | None = None,
                 watch: Callable[[memoryview], Arrived] | None = None) -> bytes | bytearray | memoryview:
        """The next ``n`` bytes. A body larger than what is buffered is received straight into
        one buffer and returned as it is (a ``bytearray``, or a view of ``into`` where that is
        large enough: no second copy of a piece). ``watch``: as ``response``'s, given the buffer."""
        if len(self._buf) >= n:
            body = bytes(self._buf[:n])
            del self._buf[:n]
            if watch is not None:
                watch(memoryview(body))(n)
            return body
        assert self.sock is not None
        out: bytearray | memoryview = bytearray(n) if into is None or len(into) < n else memoryview(into)[:n]
        have = len(self._buf)
        out[:have] = self._buf
        self._buf.clear()
        view = memoryview(out)
        if n - have >= WAITALL and not self._widened:
            self._widen()
        recv_body(self.sock, view, have, self.timeout, None if watch is None else watch(view))
        return out

    def _widen(self) -> None:
        """Ask for a receive buffer of RCVBUF, once, on a connection that receives big bodies
        (where the kernel grants it: ``rcvbuf_to_ask``). Measured on loopback: a new client's 1 GiB
        get took 0.63-1.0 ms of client CPU per MiB with the kernel's autotuned buffers, which grow
        from 128 KiB, and 0.49-0.58 with this (docs/benchmarks.md, "Ninth round")."""
        assert self.sock is not None
        self._widened = True
        ask = rcvbuf_to_ask(rmem_max(), self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        if ask is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ask)

    def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            while (end := self._buf.find(b"\r\n")) < 0:
                self._fill()
            size_field = bytes(self._buf[:end]).split(b";", 1)[0].strip()
            del self._buf[: end + 2]
            try:
                size = int(size_field, 16)
            except ValueError as exc:
                raise BadResponse("bad chunk size") from exc
            if size == 0:  # then an empty line, or trailer lines and an empty line
                while len(self._buf) < 2:
                    self._fill()
                if self._buf[:2] == b"\r\n":
                    del self._buf[:2]
                else:
                    self._line_block()
                return bytes(out)
            out += self._exactly(size)
            if self._exactly(2) != b"\r\n":
                raise BadResponse("chunk not followed by CRLF")

    def _until_close(self) -> bytes:
        assert self.sock is not None
        while data := self.sock.recv(256 * 1024):
            self._buf += data
        body = bytes(self._buf)
        self._buf.clear()
        return body


def rcvbuf_to_ask(limit: int | None, current: int, want: int = RCVBUF) -> int | None:
    """The SO_RCVBUF to set on a connection that receives big bodies: ``want`` if the kernel
    grants all of it (``limit``, its net.core.rmem_max, is at least that) and the buffer is
    smaller now (the kernel reports twice what was set); else None. A fixed buffer ends the
    kernel's autotuning, so one smaller than asked (a default rmem_max is ~208 KiB) would only
    slow the connection down."""
    if limit is None or limit < want or current >= 2 * want:
        return None
    return want


_rmem_max: list[int | None] = []


def rmem_max() -> int | None:
    """The kernel's net.core.rmem_max (the largest SO_RCVBUF it grants), None where unknown."""
    if not _rmem_max:
        try:
            with open("/proc/sys/net/core/rmem_max") as f:
                _rmem_max.append(int(f.read()))
        except (OSError, ValueError):
            _rmem_max.append(None)
    return _rmem_max[0]


def set_recv_timeout(sock: socket.socket, timeout: float) -> None:
    """``timeout`` as the socket's SO_RCVTIMEO: how long a blocking receive waits for bytes."""
    sec = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((timeout - sec) * 1e6)))


def recv_body(sock: socket.socket, view: memoryview, have: int, timeout: float,
              arrived: Arrived | None = None) -> None:
    """Fill ``view`` from byte ``have`` on, from ``sock``; ConnectionError if the stream ends
    first. ``arrived``, if given, is called with how many bytes are in, at the start and after
    each receive (slices of at most SLICE bytes).

    A socket with a timeout is non-blocking underneath, so CPython polls before each
    ``recv_into``, which then returns only what has arrived: a piece takes many pairs of system
    calls, each pair giving up and taking back the interpreter lock. A rest of at least WAITALL
    bytes is received instead with the socket blocking and ``MSG_WAITALL``, a slice per call: the
    kernel fills it as the bytes arrive, with the lock released. The timeout still
    holds: the kernel's SO_RCVTIMEO (``set_recv_timeout``, set to ``timeout``) ends a receive
    that waited that long, with what it got (the loop asks again) or with nothing, which is
    TimeoutError, as a receive on a socket with a timeout."""
    n = len(view)
    if arrived is not None:
        arrived(have)
    waitall = n - have >= WAITALL and sock.gettimeout() is not None
    if waitall:
        sock.settimeout(None)
    try:
        while have < n:
            if waitall:
                try:
                    k = sock.recv_into(view[have:], min(SLICE, n - have), socket.MSG_WAITALL)
                except BlockingIOError:  # SO_RCVTIMEO ran out with nothing received
                    raise TimeoutError(f"no bytes for {timeout} s") from None
            else:
                k = sock.recv_into(view[have : have + SLICE])
            if not k:
                raise ConnectionError("the server closed the connection mid-body")
            have += k
            if arrived is not None:
                arrived(have)
    finally:
        if waitall:
            sock.settimeout(timeout)


def _poll(sock: socket.socket, spin: float) -> bytes | None:
    """What has arrived on ``sock``, polled without blocking for up to ``spin`` seconds; None if
    nothing came by then. A small answer from a server on the same machine comes back in tens of
    microseconds, and a thread that sleeps in ``recv`` meanwhile pays a wake-up that costs more
    than that (measured: a lone thread's stat spent ~70 µs of CPU on each side in sleeps and
    wake-ups)."""
    if sock.gettimeout() is None:
        return None  # a blocking socket: os.read would sleep
    return poll_read(sock.fileno(), time.perf_counter() + spin)  # non-blocking underneath (it has a timeout)


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)``, tried first as one non-blocking ``os.write``: a socket with a
    timeout is non-blocking underneath and ``sendall`` polls it before each send, a system call
    (and a turn of the interpreter lock) that a small request, which the socket takes whole, does
    not need. What the write did not take goes by ``sendall``."""
    n = 0
    if sock.gettimeout() is not None:
        try:
            n = os.write(sock.fileno(), data)
        except BlockingIOError:
            n = 0
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def poll_read(fd: int, until: float, size: int = RECV) -> bytes | None:
    """Up to ``size`` bytes from the non-blocking descriptor ``fd``, polled until the
    ``time.perf_counter()`` value ``until``: None if nothing came by then, b"" at the end of the
    stream (a failed read raises its OSError). Each poll is one non-blocking read (``os.read`` skips the poll a
    socket with a timeout makes before it), and ``sched_yield`` between polls lets any thread
    that is ready run first."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            if time.perf_counter() >= until:
                return None
            os.sched_yield()
