"""The client's write pipeline keeps a window of pieces in flight, sends them in order, and keeps
for a chunk only the replicas that acknowledged every piece of it (no server: a fake _req)."""

import threading
import time

import pytest

from kubegfs.client import _Chunk, _Pipeline
from kubegfs.errors import Unavailable

REPLICAS = [{"id": f"r{i}", "address": f"http://r{i}"} for i in (1, 2, 3)]


class FakeClient:
    """Answers each piece after a short delay; ``miss`` and ``down`` make replicas fail."""

    def __init__(self, miss: dict[int, str] | None = None, down: set[tuple[str, int]] | None = None) -> None:
        self.lock = threading.Lock()
        self.sent: list[tuple[str, int, str]] = []  # (head, offset, chain) in the order sent
        self.inflight = self.most = 0
        self.miss = miss or {}  # offset -> replica id that does not store it
        self.down = down or set()  # (head id, offset) whose request fails
        self.data_ports: dict[str, str] = {}  # main base URL -> data port base URL

    def _req(self, method, url, *, data, decode, params, headers, on_sent):
        head = url.split("//")[1].split("/")[0]
        off = params["offset"]
        with self.lock:
            self.sent.append((head, off, headers["X-Kubegfs-Chain"]))
            self.inflight += 1
            self.most = max(self.most, self.inflight)
        on_sent()
        time.sleep(0.02)
        with self.lock:
            self.inflight -= 1
        if (head, off) in self.down:
            raise Unavailable(f"{head} is down")
        chain = [head.removesuffix("-data")] + [u.split("//")[1] for u in headers["X-Kubegfs-Chain"].split(",") if u]
        return {"acked": [r for r in chain if self.miss.get(off) != r]}

    def close_connections(self) -> None:
        pass


def _put(client, pieces: int, sync_last: bool = True):
    p = _Pipeline(client)
    chunk = _Chunk({"handle": "00000000000000aa", "version": 1, "replicas": REPLICAS}, 0)
    for i in range(pieces):
        p.send(chunk, i * 10, b"x" * 10, sync_last and i == pieces - 1)
    return p.finish()


def test_pieces_go_out_in_order_with_a_window_in_flight():
    c = FakeClient()
    assert _put(c, 12) == {0: ["r1", "r2", "r3"]}
    assert [off for _, off, _ in c.sent] == [i * 10 for i in range(12)]
    assert c.most == _Pipeline.WINDOW  # not one at a time


def test_a_replica_that_misses_one_piece_is_not_a_replica_of_the_chunk():
    c = FakeClient(miss={50: "r3"})
    assert _put(c, 12) == {0: ["r1", "r2"]}
    assert all("r3" not in chain for _, off, chain in c.sent if off > 90)  # left out of later chains


def test_a_failed_head_sends_the_piece_to_the_rest_of_its_chain():
    c = FakeClient(down={("r1", 30)})
    assert _put(c, 8) == {0: ["r2", "r3"]}
    assert ("r2", 30, "http://r3") in c.sent  # the resend
    assert c.sent[-1][0] == "r2"


def test_a_chunk_without_replicas_fails_the_put():
    c = FakeClient(down={(r, 0) for r in ("r1", "r2", "r3")})
    with pytest.raises(Unavailable, match="no replica accepted"):
        _put(c, 1)


def test_parts_hand_out_views_of_the_pieces_in_order():
    from kubegfs.client import _Parts

    buf = _Parts()
    a, b = b"a" * 5, b"b" * 7
    buf.add(a)
    buf.add(memoryview(b))
    buf.add(b"")
    assert len(buf) == 12
    first = buf.take(3)
    assert [bytes(p) for p in first] == [b"aaa"] and first[0].obj is a  # a view, not a copy
    assert [bytes(p) for p in buf.take(6)] == [b"aa", b"bbbb"]
    assert len(buf) == 3 and [bytes(p) for p in buf.take(10)] == [b"bbb"]
    assert buf.take(4) == [] and len(buf) == 0


def test_parts_copy_a_buffer_the_caller_may_change():
    from kubegfs.client import _Parts

    buf = _Parts()
    mine = bytearray(b"12345")
    buf.add(mine)
    mine[:] = b"xxxxx"  # the caller reuses its buffer once put has read it
    assert b"".join(buf.take(5)) == b"12345"


def test_a_piece_whose_data_port_cannot_be_reached_goes_to_the_same_heads_main_port():
    """The head's data port fails: each piece goes to the head again, on its main port, with the
    same chain (not to the rest of the chain, and no replica is dropped); the port is forgotten."""
    c = FakeClient(down={("r1-data", off) for off in (0, 10, 20)})
    c.data_ports["http://r1"] = "http://r1-data"
    assert _put(c, 3) == {0: ["r1", "r2", "r3"]}
    assert {off for h, off, _ in c.sent if h == "r1"} == {0, 10, 20}
    assert {h for h, _, _ in c.sent} == {"r1", "r1-data"}
    assert {chain for _, _, chain in c.sent} == {"http://r2,http://r3"}
    assert c.data_ports == {}


def test_pieces_go_to_a_heads_data_port_once_it_is_known():
    c = FakeClient()
    c.data_ports["http://r1"] = "http://r1-data"
    assert _put(c, 3) == {0: ["r1", "r2", "r3"]}
    assert {h for h, _, _ in c.sent} == {"r1-data"}
