"""The client's lean HTTP/1.1 connection reads every answer shape kubegfs servers send, and a
broken answer is a connection error, never a wrong body."""

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from kubegfs import httpconn
from kubegfs.httpconn import BadResponse, Connection, _poll, poll_read


def _serve(answers: list[bytes]) -> tuple[int, list[bytes]]:
    """A one-connection server: reads one request per canned answer and sends it back."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got: list[bytes] = []

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            buf = b""
            for ans in answers:
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, _, buf = buf.partition(b"\r\n\r\n")
                n = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
                while len(buf) < n:
                    buf += conn.recv(65536)
                got.append(head + b"\r\n\r\n" + buf[:n])
                buf = buf[n:]
                conn.sendall(ans)

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1], got


def test_keep_alive_lengths_chunked_and_big_bodies():
    big = bytes(range(256)) * 40_000  # bigger than one recv: read into its own buffer
    port, got = _serve([
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-msgpack\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nT: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ])
    c = Connection("127.0.0.1", port, 5)
    r = c.request("GET", "/a?b=1", None, {"Authorization": "Bearer t"})
    assert (r.status, r.body, r.headers["content-type"], r.will_close) == (200, b"abc", "application/x-msgpack", False)
    r = c.request("POST", "/c", b"x" * 100_000, {})  # a body sent apart from the head
    assert (r.status, bytes(r.body)) == (201, b"wikipedia")
    assert bytes(c.request("GET", "/big", None, {}).body) == big
    assert c.request("DELETE", "/d", None, {}).body == b""
    r = c.request("GET", "/e", None, {})
    assert r.status == 404 and r.will_close
    assert got[0].startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer t\r\n" in got[0] and b"Content-Length: 0\r\n" in got[0]
    assert got[1].endswith(b"x" * 100_000)
    c.close()


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_a_malformed_answer_is_a_connection_error(answer):
    port, _ = _serve([answer])
    with pytest.raises(BadResponse):
        Connection("127.0.0.1", port, 5).request("GET", "/", None, {})


def test_a_cut_body_is_a_connection_error():
    port, _ = _serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
    with pytest.raises(ConnectionError):
        Connection("127.0.0.1", port, 5).request("GET", "/", None, {})


def test_a_big_body_goes_into_the_given_buffer_and_an_error_body_does_not():
    big = bytes(range(256)) * 1_000
    port, _ = _serve([
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
    ])
    c = Connection("127.0.0.1", port, 5)
    buf = bytearray(len(big) + 10)
    c.send("GET", "/x", None, {})
    r = c.response("GET", into=buf)
    assert isinstance(r.body, memoryview) and r.body.obj is buf and bytes(r.body) == big
    c.send("GET", "/y", None, {})
    r = c.response("GET", into=buf)
    assert r.status == 404 and not isinstance(r.body, memoryview) and bytes(r.body) == big
    c.close()


def test_polling_returns_what_arrives_during_the_spin_and_gives_up_after_it():
    a, b = socket.socketpair()
    a.settimeout(5)  # non-blocking underneath, as every client socket
    with a, b:
        assert _poll(a, 0.002) is None  # nothing came
        threading.Timer(0.001, b.sendall, (b"hello",)).start()
        got = _poll(a, 2.0)
        assert got == b"hello"
        a.settimeout(None)
        assert _poll(a, 0.01) is None  # a blocking socket is never polled (os.read would sleep)


def test_poll_read_gives_the_end_of_the_stream_and_raises_a_failed_read():
    a, b = socket.socketpair()
    a.setblocking(False)
    with a:
        b.close()
        assert poll_read(a.fileno(), time.perf_counter() + 1.0) == b""  # EOF: at once, not after the spin
    with pytest.raises(OSError):
        poll_read(a.fileno(), time.perf_counter() + 0.01)  # closed


def _serve_raw(send: Callable[[socket.socket], None]) -> int:
    """A one-connection server that reads one request head, then runs ``send(conn)``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            send(conn)

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def test_a_big_body_arriving_in_bursts_is_received_whole_and_watched_slice_by_slice():
    big = os.urandom(httpconn.WAITALL + 3 * httpconn.SLICE + 12_345)
    assert len(big) >= httpconn.WAITALL  # received with blocking MSG_WAITALL receives

    def send(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: %d\r\n\r\n" % len(big) + big[:1000])
        for i in range(1000, len(big), 300_000):
            time.sleep(0.02)
            conn.sendall(big[i : i + 300_000])
        time.sleep(0.5)

    c = Connection("127.0.0.1", _serve_raw(send), 5)
    seen: list[int] = []
    bodies: list[memoryview] = []

    def watch(headers: dict[str, str], body: memoryview) -> httpconn.Arrived:
        assert headers["x-a"] == "b" and len(body) == len(big)
        bodies.append(body)
        return seen.append

    buf = bytearray(len(big))
    c.send("GET", "/", None, {})
    r = c.response("GET", into=buf, watch=watch)
    assert bytes(r.body) == big and bodies[0].obj is buf
    assert seen[-1] == len(big) and seen == sorted(seen)
    assert all(b - a <= httpconn.SLICE for a, b in zip(seen, seen[1:], strict=False))
    assert c.sock is not None and c.sock.gettimeout() == 5  # (blocking only while receiving the body)
    c.close()


def test_a_server_that_stalls_mid_body_is_a_timeout_not_a_hang():
    def send(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * httpconn.WAITALL) + b"x" * 500_000)
        time.sleep(5)  # then nothing, the connection open

    c = Connection("127.0.0.1", _serve_raw(send), 0.3)
    c.send("GET", "/", None, {})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        c.response("GET", into=bytearray(4 * httpconn.WAITALL))
    assert time.monotonic() - t0 < 3


def test_what_a_watch_raises_ends_the_answer():
    big = os.urandom(2 * httpconn.WAITALL)

    def send(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)

    def arrived(end: int) -> None:
        if end > httpconn.SLICE:
            raise ValueError("bad block")

    c = Connection("127.0.0.1", _serve_raw(send), 5)
    c.send("GET", "/", None, {})
    with pytest.raises(ValueError):
        c.response("GET", watch=lambda headers, body: arrived)


def test_a_big_receive_buffer_is_asked_for_only_where_the_kernel_grants_it_all():
    big = httpconn.RCVBUF
    assert httpconn.rcvbuf_to_ask(big, 131072) == big
    assert httpconn.rcvbuf_to_ask(4 * big, 131072) == big
    assert httpconn.rcvbuf_to_ask(212992, 131072) is None  # a default rmem_max: autotuning stays
    assert httpconn.rcvbuf_to_ask(None, 131072) is None  # unknown (not Linux)
    assert httpconn.rcvbuf_to_ask(big, 2 * big) is None  # as big already


def test_a_connection_widens_its_receive_buffer_once_it_receives_a_big_body():
    big = os.urandom(2 * httpconn.WAITALL)
    port, _ = _serve([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
                      b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big])
    c = Connection("127.0.0.1", port, 5)
    assert c.sock is not None
    before = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert c.request("GET", "/a", None, {}).body == b"abc"
    assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before and not c._widened
    assert bytes(c.request("GET", "/b", None, {}).body) == big
    assert c._widened
    if httpconn.rcvbuf_to_ask(httpconn.rmem_max(), before) is not None:
        assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= httpconn.RCVBUF
    c.close()


def test_send_all_sends_what_one_write_does_not_take_and_raises_on_a_closed_peer():
    a, b = socket.socketpair()
    a.settimeout(10)  # non-blocking underneath: one os.write takes only what the buffer holds
    data = os.urandom(8 * 1024 * 1024)
    got = bytearray()

    def read() -> None:
        while len(got) < len(data):
            got.extend(b.recv(1 << 20))

    t = threading.Thread(target=read)
    t.start()
    httpconn.send_all(a, data)
    t.join(30)
    assert bytes(got) == data
    httpconn.send_all(a, b"small")
    assert b.recv(16) == b"small"
    b.close()
    with pytest.raises(OSError):
        for _ in range(4):
            httpconn.send_all(a, b"x" * 65536)
    a.close()
