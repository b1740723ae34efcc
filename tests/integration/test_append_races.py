"""Appends in place racing with re-replication and with failed replica writes: no replica that
the master lists may ever lack acknowledged bytes (a CI run once caught re-replication copying a
chunk between an append's version bump and its data write)."""

import random
import signal
import time

import pytest
import requests

from kubegfs_dev.util import bearer, wait_for

CHUNK = 256 * 1024
TAIL = b"appended in place"


@pytest.fixture
def four(make_cluster):
    return make_cluster(4, dead_after=1.0)


def file_with_open_append(c, seed):
    """/f spans a full chunk and a partial one; an append lease is open on it (its last chunk's
    version already bumped, no bytes written yet)."""
    body = random.Random(seed).randbytes(CHUNK + 100)
    c.put("/f", body)
    lease = c.api("POST", "/fs/open", json={"path": "/f", "mode": "append", "file_mode": 0o644})
    assert lease["last"], "the file must end in a partial chunk"
    return body, lease, lease["last"]


def write_piece(c, last, replica_ids, data):
    for rep in last["replicas"]:
        if rep["id"] in replica_ids:
            r = requests.put(f"{rep['address']}/internal/chunks/{last['handle']}", headers=bearer(c.token), timeout=30,
                        params={"offset": last["offset"], "version": last["version"], "sync": "1"}, data=data)
            assert r.status_code == 200, r.text


def commit(c, lease, path, size, acked):
    layout = c.layout(path)
    chunks = [{"handle": ch["handle"], "replicas": []} for ch in layout["chunks"]]
    chunks[-1] = {"handle": lease["last"]["handle"], "replicas": sorted(acked)}
    return c.api("POST", "/fs/commit", json={"lease": lease["lease"], "size": size, "chunks": chunks})


def every_replica_holds(c, path, want, chunk=CHUNK):
    lay = c.layout(path)
    for i, ch in enumerate(lay["chunks"]):
        part = want[i * chunk:(i + 1) * chunk]
        for rep in ch["replicas"]:
            got = b""
            while len(got) < len(part):  # a read returns at most 8 MiB
                r = requests.get(f"{rep['address']}/internal/chunks/{ch['handle']}", headers=bearer(c.token), timeout=30,
                            params={"offset": len(got), "length": min(len(part) - len(got), 8 << 20),
                                    "version": ch["version"]})
                assert r.status_code == 200 and r.content, (path, i, rep, r.status_code)
                got += r.content
            assert got == part, (path, i, rep)
    return lay


def test_rereplication_waits_for_an_open_append(four):
    c = four.client()
    body, lease, last = file_with_open_append(c, 5)
    holders = {r["id"] for r in last["replicas"]}
    victim = next(p for p in four.chunkservers
                  if p.url in {r["address"] for r in last["replicas"]})
    four.kill(victim, signal.SIGKILL)
    wait_for(lambda: sum(x["alive"] for x in c.chunkservers()) == 3, timeout=20, what="the victim declared dead")
    # several re-replication passes go by: the chunk under an open append must not be copied
    time.sleep(3 * 2.0)
    lay = c.layout("/f")
    assert {r["id"] for r in lay["chunks"][-1]["replicas"]} < holders
    assert c.status()["under_replicated"] >= 1
    alive_holders = {r["id"] for r in lay["chunks"][-1]["replicas"]}
    write_piece(c, last, alive_holders, TAIL)
    commit(c, lease, "/f", len(body) + len(TAIL), alive_holders)
    wait_for(lambda: c.status()["under_replicated"] == 0, timeout=30, what="re-replication after the commit")
    lay = every_replica_holds(c, "/f", body + TAIL)
    assert len(lay["chunks"][-1]["replicas"]) == 3
    assert c.get("/f") == body + TAIL


def test_replica_that_missed_part_of_an_append_is_retired(four):
    c = four.client()
    body, lease, last = file_with_open_append(c, 6)
    ids = [r["id"] for r in last["replicas"]]
    assert len(ids) == 3
    acked, missed = set(ids[:2]), ids[2]
    write_piece(c, last, acked, TAIL)  # the third never gets the bytes (as if its PUT failed)
    commit(c, lease, "/f", len(body) + len(TAIL), acked)
    lay = c.layout("/f")
    assert lay["chunks"][-1]["version"] == last["version"] + 1  # the missed copy is now detectably stale
    assert missed not in {r["id"] for r in lay["chunks"][-1]["replicas"]}
    wait_for(lambda: c.status()["under_replicated"] == 0, timeout=30, what="a replacement replica")
    lay = every_replica_holds(c, "/f", body + TAIL)
    assert len(lay["chunks"][-1]["replicas"]) == 3
    # the short copy is gone from the chunkserver that missed the write (or replaced by a full one)
    addr = next(x["address"] for x in c.chunkservers() if x["id"] == missed)
    h = lay["chunks"][-1]["handle"]

    def short_copy_gone():
        r = requests.get(f"{addr}/internal/chunks/{h}", headers=bearer(c.token), timeout=30, params={"offset": 0, "length": CHUNK})
        return r.status_code == 404 or r.content == (body + TAIL)[CHUNK:]

    wait_for(short_copy_gone, timeout=20, what="the short copy to be deleted")
    assert c.get("/f") == body + TAIL


def test_replica_killed_mid_chunk_is_left_out_and_its_partial_copy_dropped(make_cluster):
    """Pieces stream to the replicas ahead of their answers; a replica that dies after taking
    some pieces of a chunk is not acknowledged for it, and its unsynced partial copy does not
    survive its restart."""
    cl = make_cluster(3, chunk_size=16 << 20)
    c = cl.client()
    rng = random.Random(7)
    pieces = [rng.randbytes(4 << 20) for _ in range(6)]  # 24 MiB: a full chunk and half of one
    victim = cl.chunkservers[1]

    def source():
        for i, p in enumerate(pieces):
            if i == 2:
                cl.kill(victim, signal.SIGKILL)
            yield p

    c.put("/big", source())
    want = b"".join(pieces)
    assert c.get("/big") == want
    lay = c.layout("/big")
    dead = next(x["id"] for x in c.chunkservers() if x["address"] == victim.url)
    assert all(dead not in {r["id"] for r in ch["replicas"]} for ch in lay["chunks"])
    assert all(len(ch["replicas"]) == 2 for ch in lay["chunks"])
    cl.start_chunkserver(victim)
    wait_for(lambda: c.status()["under_replicated"] == 0, timeout=60, what="re-replication to the restarted server")
    lay = every_replica_holds(c, "/big", want, chunk=16 << 20)
    assert all(len(ch["replicas"]) == 3 for ch in lay["chunks"])


def test_new_chunk_replica_that_missed_its_last_piece_is_never_listed(cluster):
    """A replica that durably took the first pieces of a new chunk but not the last is left out
    at commit, and stays out when it reports the chunk again (here: after a restart, with the
    same version 1 as the good copies)."""
    c = cluster.client()
    lease = c.api("POST", "/fs/open", json={"path": "/n", "mode": "create", "file_mode": 0o644})
    cur = c.api("POST", "/fs/alloc", json={"lease": lease["lease"]})
    head, tail = b"h" * 1000, b"t" * 1000
    for rep in cur["replicas"]:
        for off, piece in ((0, head), (len(head), tail)):
            if off and rep is cur["replicas"][-1]:
                continue  # the last replica never gets the tail
            r = requests.put(f"{rep['address']}/internal/chunks/{cur['handle']}", headers=bearer(c.token), timeout=30,
                        params={"offset": off, "version": 1, "sync": "1"}, data=piece)
            assert r.status_code == 200
    acked = [r["id"] for r in cur["replicas"][:-1]]
    c.api("POST", "/fs/commit", json={"lease": lease["lease"], "size": len(head + tail),
                                       "chunks": [{"handle": cur["handle"], "replicas": acked}]})
    short = cur["replicas"][-1]
    proc = next(p for p in cluster.chunkservers if p.url == short["address"])
    cluster.kill(proc, signal.SIGKILL)
    cluster.start_chunkserver(proc)
    wait_for(lambda: c.status()["under_replicated"] == 0, timeout=30, what="the short copy replaced")
    every_replica_holds(c, "/n", head + tail)
    assert c.get("/n") == head + tail


def test_a_copy_reported_corrupt_during_an_append_is_still_replaced(four):
    """The order to delete a corrupt copy waits while an append lease holds the chunk, and goes
    out when the lease ends (it used to be dropped for good: the copy stayed corrupt)."""
    cl = four
    c = cl.client()
    body, lease, last = file_with_open_append(c, 7)
    h = last["handle"]
    victim = next(p for p in cl.chunkservers if p.url == last["replicas"][0]["address"])
    path = victim.data / "chunks" / h[-2:] / f"{h}.chk"
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))
    auth = {"Authorization": f"Bearer {cl.internal_token}"}
    requests.post(victim.url + "/internal/scrub", headers=auth, timeout=30)
    wait_for(lambda: {r["address"] for r in c.layout("/f")["chunks"][-1]["replicas"]} == {
             r["address"] for r in last["replicas"][1:]}, timeout=20, what="the corrupt copy unlisted")
    time.sleep(1.0)  # several heartbeats while the lease holds the chunk
    c.api("POST", "/fs/abort", json={"lease": lease["lease"]})
    wait_for(lambda: not path.exists() or path.read_bytes() != bytes(raw), timeout=20,
             what="the corrupt copy deleted or replaced")
    wait_for(lambda: c.status()["under_replicated"] == 0, timeout=30, what="heal")
    assert c.get("/f") == body
