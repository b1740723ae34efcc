"""The lean listener polls a plain connection for its next request after answering, for at most
its spin after each answer and its budget in all, and never a TLS one (kubegfs/master/fastpath.py)."""

import socket
import ssl
import threading
import time
from typing import Any

import pytest

from kubegfs import metrics as M
from kubegfs.auth import Tokens, master_policy
from kubegfs.master.fastpath import FastProtocol
from kubegfs.web import RequestMetrics

REQ = b"GET /api/v1/fs/stat?path=/a HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer tok\r\n\r\n"


class _Transport:
    def __init__(self, sock: socket.socket, tls: bool = False) -> None:
        self.extra: dict[str, Any] = {"socket": sock, "sslcontext": ssl.create_default_context() if tls else None}
        self.out = bytearray()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        pass


def _listener(spin: float, budget: float = 1.0, tls: bool = False) -> tuple[FastProtocol, _Transport, socket.socket]:
    served, peer = socket.socketpair()
    served.setblocking(False)
    routes = {("GET", "/api/v1/fs/stat"): lambda q, b, c, p: (b'{"path":"%s"}' % q["path"].encode(), "application/json")}
    proto = FastProtocol(routes, Tokens("tok"), master_policy, lambda m, p: None, RequestMetrics(M.MASTER_HTTP),
                         spin=spin, budget=budget)
    t = _Transport(served, tls)
    proto.connection_made(t)  # type: ignore[arg-type]
    return proto, t, peer


def _answers(t: _Transport) -> int:
    return bytes(t.out).count(b"HTTP/1.1 200 ")


def test_a_request_already_waiting_is_answered_in_the_same_turn():
    proto, t, peer = _listener(spin=0.05)
    with peer:
        peer.sendall(REQ)  # the next request, waiting in the socket
        proto.data_received(REQ)
        assert _answers(t) == 2


def test_a_request_that_comes_within_the_spin_is_answered_in_the_same_turn():
    proto, t, peer = _listener(spin=2.0)
    with peer:
        threading.Timer(0.005, peer.sendall, (REQ,)).start()
        threading.Timer(0.05, peer.close).start()  # then the end of the stream ends the turn at once
        t0 = time.perf_counter()
        proto.data_received(REQ)
        assert _answers(t) == 2 and time.perf_counter() - t0 < 1.0


def test_nothing_is_polled_without_a_spin_past_the_budget_or_over_tls():
    for proto, t, peer in (_listener(spin=0.0), _listener(spin=0.05, budget=0.0), _listener(spin=0.05, tls=True)):
        with peer:
            peer.sendall(REQ)
            proto.data_received(REQ)
            assert _answers(t) == 1
            peer.settimeout(1)
            assert proto.transport is not None  # the waiting request is still the transport's to read


def test_the_turn_ends_after_the_spin_when_nothing_comes():
    proto, t, peer = _listener(spin=0.01)
    with peer:
        t0 = time.perf_counter()
        proto.data_received(REQ)
        assert _answers(t) == 1 and 0.01 <= time.perf_counter() - t0 < 0.5


def test_the_master_cli_sets_the_spin_and_zero_turns_it_off(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kubegfs.cli import main
    from kubegfs.master import server

    seen = []
    monkeypatch.setattr(server, "run", lambda *a: seen.append(a[6].fast_spin))
    base = ["master", "--token", "t", "--data", str(tmp_path)]
    for extra, want in (([], 100e-6), (["--fast-spin-us", "0"], 0.0), (["--fast-spin-us", "250"], 250e-6)):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 0, r.output
        assert seen.pop() == pytest.approx(want)
    r = CliRunner().invoke(main, [*base, "--fast-spin-us", "-1"])
    assert r.exit_code == 2 and not seen
