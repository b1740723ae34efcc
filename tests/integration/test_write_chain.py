"""Chained writes: the client sends each piece to the first replica, which forwards it down the
chain while it stores it; every replica holds every acknowledged byte, and a replica that dies
anywhere in the chain leaves a write that still succeeds on the others."""

import os
import signal

import pytest
import requests

from kubegfs.errors import Unavailable

CHUNK = 256 * 1024  # tests/integration/conftest.py: the clusters' chunk size


def _copies(cluster, c, path):
    """Each replica's bytes of each chunk, read from that replica alone."""
    lay = c.layout(path)
    out = []
    for ch in lay["chunks"]:
        got = {}
        for r in ch["replicas"]:
            got[r["id"]] = bytes(c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
                                        params={"offset": 0, "length": CHUNK, "version": ch["version"]}))
        out.append(got)
    return out


def test_every_replica_gets_every_piece(cluster):
    c = cluster.client()
    data = os.urandom(CHUNK * 2 + 12345)  # three chunks, the last partial
    c.put("/f", data)
    assert c.get("/f") == data
    copies = _copies(cluster, c, "/f")
    assert [len(g) for g in copies] == [3, 3, 3]
    for i, g in enumerate(copies):
        assert set(g.values()) == {data[i * CHUNK:(i + 1) * CHUNK]}
    c.put("/f", b"tail", append=True)  # an append in place goes down the chain too
    assert c.get("/f") == data + b"tail"
    assert {len(v) for v in _copies(cluster, c, "/f")[-1].values()} == {12345 + 4}


def _chain_order(c):
    """The replica order the master gives a new chunk now (the head first)."""
    lease = c.api("POST", "/fs/open", json={"path": "/probe", "mode": "create", "alloc": True})
    c.api("POST", "/fs/abort", json={"lease": lease["lease"]})
    return [r["id"] for r in lease["first"]["replicas"]]


@pytest.mark.parametrize("position", [0, 1, 2], ids=["head", "middle", "tail"])
def test_a_dead_replica_anywhere_in_the_chain_is_left_out(make_cluster, position):
    cluster = make_cluster(dead_after=30)  # the master keeps placing on the dead one
    c = cluster.client()
    order = _chain_order(c)
    victim = order[position]
    proc = next(p for p in cluster.chunkservers if _cs_id(c, p) == victim)
    cluster.kill(proc, signal.SIGKILL)
    data = os.urandom(CHUNK + 999)
    c.put("/f", data)
    assert c.get("/f") == data
    for ch in c.layout("/f")["chunks"]:
        assert sorted(r["id"] for r in ch["replicas"]) == sorted(set(order) - {victim})
    for g in _copies(cluster, c, "/f"):
        assert len(set(g.values())) == 1 and victim not in g


def _cs_id(c, proc):
    return next(x["id"] for x in c.chunkservers() if x["address"] == proc.url)


def test_all_replicas_down_fails_the_write_and_commits_nothing(make_cluster):
    cluster = make_cluster(dead_after=30)
    c = cluster.client()
    for p in cluster.chunkservers:
        cluster.kill(p, signal.SIGKILL)
    with pytest.raises(Unavailable, match="no replica accepted"):
        c.put("/f", b"data")
    assert not c.exists("/f")


def test_direct_chain_request_answers_every_replica(shared_cluster):
    cs = shared_cluster.chunkservers
    h = {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Chain": f"{cs[1].url},{cs[2].url}"}
    r = requests.put(cs[0].url + "/internal/chunks/00000000000c4a17?version=1&offset=0", data=b"chained",
                     headers=h, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["acked"]) == 3 and body["failed"] == {}
    for p in cs:
        got = requests.get(p.url + "/internal/chunks/00000000000c4a17?version=1", headers=h, timeout=10)
        assert got.content == b"chained"


@pytest.mark.parametrize("chain", [
    "ftp://127.0.0.1:1", "http://a,http://a", ",".join(f"http://h{i}" for i in range(9)),
    "http://h/x?y", "not a url",
])
def test_bad_chain_header_is_400_and_stores_nothing(shared_cluster, chain):
    cs = shared_cluster.chunkservers[0]
    h = {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Chain": chain}
    r = requests.put(cs.url + "/internal/chunks/0000000000bad0c1?version=1", data=b"x", headers=h, timeout=5)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_argument"
    assert not [p for p in cs.data.rglob("*") if "bad0c1" in p.name]
