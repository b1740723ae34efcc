"""Reads of whole files: pieces spread over the equally near replicas, received into reused
buffers by ``get_to``, every byte as written; the chunkserver's answer to a piece is the piece."""

import io
import os
import time

import requests

import kubegfs.client as client_mod
from kubegfs.client import read_order
from kubegfs.formats import BLOCK_SIZE
from kubegfs.local import free_port

CHUNK = 256 * 1024  # tests/integration/conftest.py: the clusters' chunk size


class _Keeper(io.RawIOBase):
    """A sink that copies what it is given and remembers which buffers it was given."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.buffers: set[int] = set()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b)
        if isinstance(b, memoryview) and isinstance(b.obj, bytearray):
            self.buffers.add(id(b.obj))
        self.data += mv
        return len(mv)


def test_get_to_reuses_its_buffers_and_returns_every_byte(cluster, monkeypatch):
    monkeypatch.setattr(client_mod, "PIECE", 64 * 1024)  # 12 pieces of 64 KiB and a short one
    c = cluster.client()
    data = os.urandom(3 * CHUNK + 4321)
    c.put("/r", data)
    sink = _Keeper()
    assert c.get_to("/r", sink) == len(data)
    assert bytes(sink.data) == data
    assert 1 <= len(sink.buffers) <= client_mod.READ_AHEAD + 2  # not one buffer per piece
    assert c.get("/r") == data  # get keeps every piece: no reuse there


def test_the_layout_marks_equally_near_replicas_and_reads_use_each(cluster):
    c = cluster.client()
    c.put("/n", os.urandom(CHUNK))
    reps = c.layout("/n")["chunks"][0]["replicas"]
    assert len(reps) == 3 and all(r["near"] for r in reps)  # one machine: all equally near
    firsts = {client_mod.read_order(reps, k)[0]["id"] for k in range(3)}
    assert firsts == {r["id"] for r in reps}


def test_a_piece_answer_is_exactly_the_piece(cluster):
    c = cluster.client()
    data = os.urandom(CHUNK)
    c.put("/p", data)
    ch = c.layout("/p")["chunks"][0]
    r = ch["replicas"][0]
    for off, n in ((0, CHUNK), (100, 70_000), (CHUNK - 5, 5)):
        got = c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
                     params={"offset": off, "length": n, "version": ch["version"]})
        assert bytes(got) == data[off : off + n]


def _learn_read_ports(c, ch):
    """Read a byte from each replica's main port: its answer names its read port."""
    for r in ch["replicas"]:
        c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
               params={"offset": 0, "length": 1, "version": ch["version"]})
    assert set(c.read_ports) == {r["address"] for r in ch["replicas"]}


def _data_port_gets(cluster):
    n = 0.0
    for cs in cluster.chunkservers:
        text = requests.get(cs.url + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10).text
        for line in text.splitlines():
            if line.startswith("kubegfs_http_requests_total") and "(data port)" in line and 'method="GET"' in line \
                    and 'code="200"' in line:
                n += float(line.rsplit(" ", 1)[1])
    return n


def test_reads_on_the_read_ports_are_checked_here_and_exact(cluster, monkeypatch):
    monkeypatch.setattr(client_mod, "PIECE", 64 * 1024)
    c = cluster.client(short_circuit=False)  # the TCP path
    data = os.urandom(3 * CHUNK + 4321)
    c.put("/v", data)
    lay = c.layout("/v")
    _learn_read_ports(c, lay["chunks"][0])
    before = _data_port_gets(cluster)
    assert c.get("/v") == data
    assert not c._read_off and len(c.read_ports) == 3  # no piece fell back to a main port
    # every piece; the data port counts a request after its answer is sent, so the last may lag
    want, deadline = before + len(data) // (64 * 1024) + 1, time.monotonic() + 10
    while (got := _data_port_gets(cluster)) < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == want
    ch = lay["chunks"][1]
    for r in ch["replicas"]:  # ranges that are not whole blocks: the covering blocks are checked
        for off, n in ((100, 70_000), (CHUNK - 5, 5), (BLOCK_SIZE - 1, 2), (0, CHUNK), (BLOCK_SIZE, BLOCK_SIZE)):
            got = c._fetch(r["address"], ch, off, n, None)
            assert bytes(got) == data[CHUNK + off : CHUNK + off + n]
    last = lay["chunks"][3]  # the file's short last chunk, read past its end: what there is
    assert bytes(c._fetch(last["replicas"][0]["address"], last, 4000, 1000, None)) == data[3 * CHUNK + 4000 :]
    assert (c.stats.mismatches, c.stats.corrupt, c.stats.failovers) == (0, 0, 0)


def test_a_read_port_that_cannot_be_reached_falls_back_to_the_main_port(cluster):
    c = cluster.client(short_circuit=False)  # the TCP path
    data = os.urandom(CHUNK + 10)
    c.put("/u", data)
    lay = c.layout("/u")
    _learn_read_ports(c, lay["chunks"][0])
    dead = free_port()  # nothing listens there
    for base in list(c.read_ports):
        c.read_ports[base] = f"http://127.0.0.1:{dead}"
    assert c.get("/u") == data
    assert c.stats.failovers == 0
    used = {read_order(ch["replicas"], 0)[0]["address"] for ch in lay["chunks"]}
    assert used <= c._read_off and not used & set(c.read_ports)
    ch = lay["chunks"][0]
    for base in used:  # its main port names it again: not taken up
        c._req("GET", f"{base}/internal/chunks/{ch['handle']}", params={"offset": 0, "length": 1,
                                                                         "version": ch["version"]})
    assert not used & set(c.read_ports)
