"""Appends in place racing with re-replication and with failed replica writes: no replica that
the master lists may ever lack acknowledged bytes (a CI run once caught re-replication copying a
chunk between an append's version bump and its data write)."""

import random
import signal
import time

import pytest

from kubegfs.testing.k8s import wait_for

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
            r = c.s.put(f"{rep['address']}/internal/chunks/{last['handle']}",
                        params={"offset": last["offset"], "version": last["version"], "sync": "1"}, data=data)
            assert r.status_code == 200, r.text


def commit(c, lease, path, size, acked):
    layout = c.layout(path)
    chunks = [{"handle": ch["handle"], "replicas": []} for ch in layout["chunks"]]
    chunks[-1] = {"handle": lease["last"]["handle"], "replicas": sorted(acked)}
    return c.api("POST", "/fs/commit", json={"lease": lease["lease"], "size": size, "chunks": chunks})


def every_replica_holds(c, path, want):
    lay = c.layout(path)
    for i, ch in enumerate(lay["chunks"]):
        part = want[i * CHUNK:(i + 1) * CHUNK]
        for rep in ch["replicas"]:
            r = c.s.get(f"{rep['address']}/internal/chunks/{ch['handle']}",
                        params={"offset": 0, "length": len(part), "version": ch["version"]})
            assert r.status_code == 200 and r.content == part, (path, i, rep)
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
        r = c.s.get(f"{addr}/internal/chunks/{h}", params={"offset": 0, "length": CHUNK})
        return r.status_code == 404 or r.content == (body + TAIL)[CHUNK:]

    wait_for(short_copy_gone, timeout=20, what="the short copy to be deleted")
    assert c.get("/f") == body + TAIL
