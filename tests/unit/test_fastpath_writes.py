"""The lean listener's durable creates (kubegfs/master/fastpath.py ``deferred`` routes): the
answer waits for the route's result, the requests behind it on the connection wait for that
answer and then come in order, and the checks before a route runs answer at once without it."""

import asyncio
import json
import socket
from typing import Any

from kubegfs import metrics as M
from kubegfs.auth import Tokens, master_policy
from kubegfs.errors import AlreadyExists, Unavailable
from kubegfs.master.fastpath import FastProtocol
from kubegfs.web import RequestMetrics


class _Transport:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = 0
        self.extra: dict[str, Any] = {"socket": sock}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.paused -= 1


def _post(path: str, body: dict[str, Any], token: str = "tok") -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


STAT = b"GET /api/v1/fs/stat?path=/a HTTP/1.1\r\nAuthorization: Bearer tok\r\n\r\n"


def _answers(t: _Transport) -> list[tuple[int, Any]]:
    out = []
    for part in bytes(t.out).split(b"HTTP/1.1 ")[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        out.append((int(head[:3]), json.loads(body)))
    return out


def _listener(gates: dict[str, asyncio.Future[None]], ran: list[str], guard: Any = lambda m, p: None,
              sock: socket.socket | None = None) -> tuple[FastProtocol, _Transport]:
    async def mkdir(q: dict[str, str], body: bytes, ctype: str, packed: bool) -> tuple[bytes, str]:
        path = json.loads(body)["path"]
        ran.append(path)
        await gates[path]  # "durable"
        if path == "/exists":
            raise AlreadyExists(f"{path} exists")
        return json.dumps({"path": path}).encode(), "application/json"

    routes = {("GET", "/api/v1/fs/stat"): lambda q, b, c, p: (b'{"stat":"%s"}' % q["path"].encode(), "application/json")}
    proto = FastProtocol(routes, Tokens("tok"), master_policy, guard, RequestMetrics(M.MASTER_HTTP),
                         spin=0.0 if sock is None else 0.5, deferred={("POST", "/api/v1/fs/mkdir"): mkdir})
    t = _Transport(sock)
    proto.connection_made(t)  # type: ignore[arg-type]
    return proto, t


def test_a_create_is_answered_once_its_route_is_done_and_what_follows_waits_for_it():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        gates = {"/x": loop.create_future(), "/y": loop.create_future()}
        ran: list[str] = []
        proto, t = _listener(gates, ran)
        proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/x"}) + STAT + _post("/api/v1/fs/mkdir", {"path": "/y"}))
        await asyncio.sleep(0.01)
        assert ran == ["/x"] and t.out == b""  # not durable yet: no answer, and the stat behind it waits
        gates["/x"].set_result(None)
        await asyncio.sleep(0.01)
        assert ran == ["/x", "/y"]
        assert _answers(t) == [(201, {"path": "/x"}), (200, {"stat": "/a"})]
        proto.data_received(STAT)  # arrives while /y waits: queued behind it
        assert len(_answers(t)) == 2
        gates["/y"].set_result(None)
        await asyncio.sleep(0.01)
        assert _answers(t)[2:] == [(201, {"path": "/y"}), (200, {"stat": "/a"})]
        assert proto.pending is None and not t.closed

    asyncio.run(run())


def test_a_failed_create_is_its_error_and_the_connection_goes_on():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        gates = {"/exists": loop.create_future()}
        gates["/exists"].set_result(None)
        proto, t = _listener(gates, [])
        proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/exists"}) + STAT)
        await asyncio.sleep(0.01)
        assert [(s, b.get("error", b.get("stat"))) for s, b in _answers(t)] == [(409, "already_exists"), (200, "/a")]

    asyncio.run(run())


def test_a_create_that_fails_its_checks_is_answered_at_once_without_running():
    async def run() -> None:
        ran: list[str] = []

        def refusing(method: str, path: str) -> None:
            if method == "POST":
                raise Unavailable("refusing")

        proto, t = _listener({}, ran, guard=refusing)
        proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/x"}, token="wrong") + STAT
                            + _post("/api/v1/fs/mkdir", {"path": "/x"}))
        assert ran == [] and proto.pending is None
        assert [(s, b.get("error", b.get("stat"))) for s, b in _answers(t)] == \
            [(401, "unauthorized"), (200, "/a"), (503, "unavailable")]

    asyncio.run(run())


def test_a_connection_that_closed_meanwhile_gets_no_answer():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        gates = {"/x": loop.create_future()}
        proto, t = _listener(gates, [])
        proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/x"}))
        proto.connection_lost(None)
        gates["/x"].set_result(None)  # the op still goes through; there is no one to tell
        await asyncio.sleep(0.01)
        assert t.out == b"" and proto.pending is None

    asyncio.run(run())


def test_reading_pauses_when_much_waits_behind_a_create():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        gates = {"/x": loop.create_future()}
        proto, t = _listener(gates, [])
        proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/x"}))
        proto.data_received(STAT * 200_000)  # far more than a head and a body
        assert t.paused == 1
        gates["/x"].set_result(None)
        await asyncio.sleep(0.01)
        assert t.paused == 0 and len(_answers(t)) == 200_001

    asyncio.run(run())


def test_after_a_create_is_answered_the_connection_is_polled_for_the_next_request():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        gates = {"/x": loop.create_future()}
        served, peer = socket.socketpair()
        served.setblocking(False)
        with served, peer:
            proto, t = _listener(gates, [], sock=served)
            proto.data_received(_post("/api/v1/fs/mkdir", {"path": "/x"}))
            peer.sendall(STAT)  # the client's next request, still in the socket (not delivered)
            gates["/x"].set_result(None)
            await asyncio.sleep(0.01)
            assert _answers(t) == [(201, {"path": "/x"}), (200, {"stat": "/a"})]  # read in the same turn

    asyncio.run(run())


def test_requests_with_the_last_ones_headers_are_parsed_for_their_own_target_and_token_checked_each_time():
    proto, t = _listener({}, [])
    other = STAT.replace(b"path=/a", b"path=/b%20c")
    proto.data_received(STAT + other + STAT.replace(b"tok", b"bad") + other + b"GET / HTTP/1.1\r\nAuthorization: Bearer tok\r\n\r\n")
    assert [(s, b.get("error", b.get("stat"))) for s, b in _answers(t)] == \
        [(200, "/a"), (200, "/b c"), (401, "unauthorized"), (200, "/b c"), (404, "not_found")]
    first = proto.last_req
    proto.data_received(other)  # the same headers as the request before: parsed once, kept
    assert proto.last_req is first and _answers(t)[-1] == (200, {"stat": "/b c"})
    proto.data_received(b"GET /api/v1/fs/stat?path=/a extra HTTP/1.1\r\nAuthorization: Bearer tok\r\n\r\n")
    assert bytes(t.out).rsplit(b"HTTP/1.1 ", 1)[1].startswith(b"400") and t.closed  # still refused
