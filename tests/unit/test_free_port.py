"""The local cluster's ports come from below the kernel's ephemeral range, never twice
(kubegfs/local.py: a port the kernel hands out can be taken before the server binds it)."""

import socket

from kubegfs import local


def test_free_ports_are_below_the_ephemeral_and_nodeport_ranges_and_never_repeat():
    top = min(local._ephemeral_low(), 30000)
    got = [local.free_port() for _ in range(300)]
    assert len(set(got)) == len(got)
    assert all(1024 <= p < top for p in got)


def test_a_port_someone_listens_on_is_not_handed_out(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        real = local.random.randrange
        tried: list[int] = []

        def pick(a: int, b: int) -> int:  # the listening port first, twice, then as before
            tried.append(busy if len(tried) < 2 else real(a, b))
            return tried[-1]

        monkeypatch.setattr(local.random, "randrange", pick)
        port = local.free_port()
        assert tried[:2] == [busy, busy] and port != busy and len(tried) >= 3
