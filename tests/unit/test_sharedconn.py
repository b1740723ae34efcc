"""The process-wide pipelined connection: concurrent callers each get the answer to their own
request, their requests are batched, and a broken connection fails every call on it (the next
call gets a new connection)."""

import socket
import threading

import pytest

from kubegfs.sharedconn import SharedConnection


class EchoServer:
    """Answers every request with its own target as the body, in order. ``close_after``: close
    the connection (unanswered) once that many requests have come in on it; ``close_header``:
    the answer to that target says ``Connection: close`` and the connection is closed after it."""

    def __init__(self, close_after: int = 0, close_header: str = "") -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.close_after, self.close_header = close_after, close_header
        self.connections = 0
        self.reads_with_several = 0  # reads that brought more than one request
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, seen = b"", 0
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                out = b""
                heads = 0
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    heads += 1
                    seen += 1
                    if self.close_after and seen >= self.close_after:
                        return
                    target = head.split(b" ")[1]
                    close = b"Connection: close\r\n" if target.decode() == self.close_header else b""
                    out += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(target), close, target)
                    if close:
                        conn.sendall(out)
                        return
                self.reads_with_several += heads > 1
                conn.sendall(out)

    def close(self) -> None:
        self.srv.close()


def _hammer(conn: SharedConnection, threads: int, calls: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for k in range(calls):
                target = f"/t{i}/{k}"
                r = conn.call("GET", target, None, {"Authorization": "Bearer x"})
                assert (r.status, bytes(r.body)) == (200, target.encode())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return errors


def test_concurrent_callers_get_their_own_answers_on_one_connection():
    srv = EchoServer()
    conn = SharedConnection("127.0.0.1", srv.port, 10)
    assert _hammer(conn, 8, 300) == []
    assert srv.connections == 1
    assert srv.reads_with_several > 0  # the calls of waiting threads went out together
    srv.close()


def test_a_broken_connection_fails_the_calls_on_it_and_the_next_call_reconnects():
    srv = EchoServer(close_after=3)
    conn = SharedConnection("127.0.0.1", srv.port, 10)
    assert bytes(conn.call("GET", "/a", None, {}).body) == b"/a"
    assert bytes(conn.call("GET", "/b", None, {}).body) == b"/b"
    with pytest.raises(ConnectionError):
        conn.call("GET", "/c", None, {})  # the server hung up on it
    assert bytes(conn.call("GET", "/d", None, {}).body) == b"/d"
    assert srv.connections == 2
    errors = _hammer(conn, 6, 50)  # every third call on a connection breaks it
    assert errors and all(isinstance(e, ConnectionError) for e in errors)
    assert bytes(conn.call("GET", "/e", None, {}).body) == b"/e"  # still usable after all that
    srv.close()


def test_an_answer_that_closes_the_connection_is_delivered():
    srv = EchoServer(close_header="/bye")
    conn = SharedConnection("127.0.0.1", srv.port, 10)
    r = conn.call("GET", "/bye", None, {})
    assert (bytes(r.body), r.will_close) == (b"/bye", True)
    assert bytes(conn.call("GET", "/again", None, {}).body) == b"/again"
    assert srv.connections == 2
    srv.close()


def test_the_process_remembers_a_bounded_number_of_listeners():
    from kubegfs import sharedconn

    first = sharedconn.shared("127.0.0.1", 1, 5)
    assert sharedconn.shared("127.0.0.1", 1, 5) is first  # one per listener
    for port in range(2, sharedconn.KEEP + 3):
        sharedconn.shared("127.0.0.1", port, 5)
    assert len(sharedconn._shared) == sharedconn.KEEP
    assert sharedconn.shared("127.0.0.1", 1, 5) is not first  # the oldest was forgotten


def test_a_request_head_is_the_same_bytes_as_encode_head_makes():
    from kubegfs import httpconn

    srv = EchoServer()
    conn = SharedConnection("127.0.0.1", srv.port, 10)
    sent: list[bytes] = []
    send_raw = httpconn.Connection.send_raw

    def spy(self: httpconn.Connection, data: bytes) -> None:
        sent.append(data)
        send_raw(self, data)

    headers = {"Authorization": "Bearer x", "Accept": "application/x-msgpack"}
    httpconn.Connection.send_raw = spy  # type: ignore[method-assign]
    try:
        for method, target, body, hdrs in [("GET", "/a?path=/x", None, headers), ("POST", "/b", b"{}", headers),
                                           ("GET", "/c", None, {"Authorization": "Bearer y"}),
                                           ("GET", "/a?path=/z", None, headers)]:
            conn.call(method, target, body, hdrs)
            assert sent[-1] == httpconn.encode_head(conn.host_header, method, target, len(body or b""), hdrs) + (body or b"")
    finally:
        httpconn.Connection.send_raw = send_raw  # type: ignore[method-assign]
        srv.close()
