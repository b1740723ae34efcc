"""Reads of whole files: pieces spread over the equally near replicas, received into reused
buffers by ``get_to``, every byte as written; the chunkserver's answer to a piece is the piece."""

import io
import os

import kubegfs.client as client_mod

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
