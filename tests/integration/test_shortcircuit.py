"""Short-circuit local reads on a LocalCluster (kubegfs/localread.py, kubegfs/chunkserver/
shortcircuit.py): a client on the chunkservers' host reads chunk files through descriptors the
chunkservers hand it over their Unix sockets, checks every block itself, and reads over TCP
whenever that fails."""

import os
import random
import signal

import pytest
import requests

import kubegfs.client as client_mod
from kubegfs import localread
from kubegfs import shortcircuit as sc
from kubegfs.client import read_order
from kubegfs.errors import Unauthorized

CHUNK = 256 * 1024


def _metric(cluster, name: str, procs=None) -> float:
    n = 0.0
    for cs in procs or cluster.chunkservers:
        text = requests.get(cs.url + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"}, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name):
                n += float(line.rsplit(" ", 1)[1])
    return n


GRANTS = "kubegfs_chunkserver_short_circuit_grants_total"


def _proc(cluster, rid: str):
    return next(p for p in cluster.chunkservers if rid.startswith(f"cs-{p.node}-"))


def test_a_local_read_goes_through_the_chunk_files_and_is_exact(cluster, monkeypatch):
    monkeypatch.setattr(client_mod, "PIECE", 64 * 1024)
    c = cluster.client()
    data = os.urandom(3 * CHUNK + 4321)
    c.put("/s", data)
    assert c.get("/s") == data  # the first piece from each replica on its main port names its socket
    assert len(c.local_sockets) == 3
    before, sc_before = _metric(cluster, GRANTS), c.stats.short_circuit
    assert c.get("/s") == data
    pieces = -(-len(data) // (64 * 1024))
    assert c.stats.short_circuit - sc_before == pieces and c.stats.short_circuit_fallbacks == 0
    assert 1 <= _metric(cluster, GRANTS) - before <= 4 * 3  # a descriptor per chunk and replica at most
    assert (c.stats.corrupt, c.stats.failovers, c.stats.mismatches) == (0, 0, 0)
    for path in c.local_sockets.values():
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_a_wrong_token_gets_no_descriptor(cluster):
    c = cluster.client()
    c.put("/w", os.urandom(1000))
    c.get("/w")
    ch = c.layout("/w")["chunks"][0]
    path = next(iter(c.local_sockets.values()))
    with pytest.raises(Unauthorized):
        localread.ask(path, "not-the-token", int(ch["handle"], 16), ch["version"])
    assert _metric(cluster, 'kubegfs_chunkserver_short_circuit_refusals_total{reason="unauthorized"}') == 1
    grant, fd = localread.ask(path, cluster.token, int(ch["handle"], 16), ch["version"])
    os.close(fd)
    assert grant.length == 1000


def test_a_corrupt_block_is_caught_here_and_read_from_another_replica(cluster):
    c = cluster.client()
    body = random.Random(3).randbytes(CHUNK + 1000)
    c.put("/f", body)
    assert c.get("/f") == body  # learns the sockets
    ch = c.layout("/f")["chunks"][0]
    first = read_order(ch["replicas"], 0)[0]
    assert first["address"] in c.local_sockets
    victim = _proc(cluster, first["id"])
    path = victim.data / "chunks" / ch["handle"][-2:] / f"{ch['handle']}.chk"
    raw = bytearray(path.read_bytes())
    raw[CHUNK - 100] ^= 0x01  # in the chunk's last block
    path.write_bytes(bytes(raw))
    assert c.get("/f") == body
    # the short-circuit check failed, then the TCP path's (read port, then the main port, which
    # reported it), then another replica served the piece
    assert c.stats.short_circuit_fallbacks == 1 and (c.stats.corrupt, c.stats.failovers) == (1, 1)
    m = requests.get(victim.url + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"}).text
    assert 'kubegfs_chunkserver_checksum_failures_total{kind="chunk"} 1.0' in m


def test_the_off_switches(cluster, monkeypatch):
    c0 = cluster.client()
    c0.put("/o", os.urandom(CHUNK))
    before = _metric(cluster, GRANTS)
    c = cluster.client(short_circuit=False)
    c.get("/o")
    c.get("/o")
    monkeypatch.setenv(client_mod.SHORT_CIRCUIT_ENV, "off")
    e = cluster.client()
    e.get("/o")
    e.get("/o")
    monkeypatch.delenv(client_mod.SHORT_CIRCUIT_ENV)
    monkeypatch.setenv(sc.HOST_ENV, "another-host")  # a client that is not on the chunkservers' host
    far = cluster.client()
    far.get("/o")
    far.get("/o")
    for x in (c, e, far):
        assert x.stats.short_circuit == 0 and not x.local_sockets
    assert _metric(cluster, GRANTS) == before


def test_a_chunkserver_that_dies_mid_read(cluster, monkeypatch):
    """Descriptors already held keep reading the files (they are still there); a new grant cannot
    be had, the TCP path fails too, and the piece comes from another replica: every byte right."""
    monkeypatch.setattr(client_mod, "PIECE", 64 * 1024)
    monkeypatch.setattr(client_mod, "READ_AHEAD", 1)
    c = cluster.client()
    data = os.urandom(4 * CHUNK)
    c.put("/d", data)
    assert c.get("/d") == data
    lay = c.layout("/d")
    victim = _proc(cluster, read_order(lay["chunks"][0]["replicas"], 0)[0]["id"])
    got = bytearray()
    it = c.read_iter("/d")
    got += next(it)
    assert victim.url in c.local_sockets
    cluster.kill(victim, signal.SIGKILL)
    for piece in it:
        got += piece
    assert bytes(got) == data
    assert c.stats.short_circuit > 0 and c.stats.failovers == 0  # the descriptors held read on
    c._local_reads.close()  # none held: the dead one's socket refuses, so does its TCP port
    assert c.get("/d") == data
    assert c.stats.failovers >= 1 and victim.url not in c.local_sockets
