"""Chained writes: the client sends each piece to the first replica, which forwards it down the
chain while it stores it; every replica holds every acknowledged byte, and a replica that dies
anywhere in the chain leaves a write that still succeeds on the others."""

import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

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
    # a chunk placed for an open write (its lease held): a made-up handle is a copy the master
    # does not know, which a heartbeat may order deleted before the reads below
    c = shared_cluster.client()
    first = c.api("POST", "/fs/open", json={"path": "/direct-chain", "mode": "create", "alloc": True})["first"]
    by_url = {p.url: p for p in shared_cluster.chunkservers}
    cs = [by_url[r["address"]] for r in first["replicas"]]
    h = {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Chain": f"{cs[1].url},{cs[2].url}"}
    target = f"/internal/chunks/{first['handle']}?version={first['version']}"
    r = requests.put(f"{cs[0].url}{target}&offset=0", data=b"chained", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["acked"]) == 3 and body["failed"] == {}
    for p in cs:
        got = requests.get(p.url + target, headers=h, timeout=10)
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


def test_a_chunks_pieces_sent_out_of_order_are_stored_in_order(cluster):
    """The client keeps several pieces in flight; a chunkserver given a later piece first holds
    it until the earlier one is written (kubegfs/chunkserver/turnstile.py), down the chain too."""
    c = cluster.client()
    lease = c.api("POST", "/fs/open", json={"path": "/ooo", "mode": "create", "alloc": True})
    first = lease["first"]
    head, rest = first["replicas"][0], first["replicas"][1:]
    data = os.urandom(3 * 50_000)
    answers: dict[int, object] = {}

    def put(i: int) -> None:
        answers[i] = c._req(
            "PUT", f"{head['address']}/internal/chunks/{first['handle']}", data=data[i * 50_000:(i + 1) * 50_000],
            decode=True, params={"offset": i * 50_000, "version": first["version"], "sync": "1" if i == 2 else "0"},
            headers={"X-Kubegfs-Chain": ",".join(r["address"] for r in rest)})

    threads = [threading.Thread(target=put, args=(i,)) for i in (2, 1)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    put(0)
    for t in threads:
        t.join()
    ids = sorted(r["id"] for r in first["replicas"])
    assert {i: sorted(a["acked"]) for i, a in answers.items()} == {0: ids, 1: ids, 2: ids}
    c.api("POST", "/fs/commit", json={"lease": lease["lease"], "size": len(data),
                                      "chunks": [{"handle": first["handle"], "replicas": ids}]})
    assert c.get("/ooo") == data
    assert [set(g.values()) for g in _copies(cluster, c, "/ooo")] == [{data}]


@pytest.mark.parametrize("port", ["main", "data"])
def test_a_body_that_breaks_off_stores_nothing_of_the_piece(cluster, port):
    """A streamed piece is written while it arrives, but it is part of the chunk only once whole:
    a client that dies mid-body leaves the chunk as it was, on every replica of the chain (on
    the main port or on the data port, kubegfs/chunkserver/dataport.py)."""
    c = cluster.client()
    c.put("/cut", b"a" * 1000)
    ch = c.layout("/cut")["chunks"][0]
    head, rest = ch["replicas"][0], ch["replicas"][1:]
    u = urlsplit(head["address"])
    if port == "data":  # named by any piece's answer
        named = requests.put(head["address"] + "/internal/chunks/00000000000da7a0?version=1", data=b"p",
                             headers={"Authorization": f"Bearer {c.token}"}, timeout=10)
        u = urlsplit(f"http://{u.hostname}:{named.headers['X-Kubegfs-Data-Port']}")
    s = socket.create_connection((u.hostname, u.port))
    s.sendall((f"PUT /internal/chunks/{ch['handle']}?offset=1000&version={ch['version']}&sync=0 HTTP/1.1\r\n"
               f"Host: x\r\nAuthorization: Bearer {c.token}\r\nContent-Length: 200000\r\n"
               f"X-Kubegfs-Chain: {','.join(r['address'] for r in rest)}\r\n\r\n").encode() + b"b" * 150_000)
    time.sleep(0.5)  # the head has streamed a batch to disk and forwarded it
    s.close()
    time.sleep(0.5)
    for g in _copies(cluster, c, "/cut"):
        assert set(g.values()) == {b"a" * 1000}
    c.put("/cut", b"c" * 10, append=True)  # the next piece goes where the cut one started
    assert c.get("/cut") == b"a" * 1000 + b"c" * 10
