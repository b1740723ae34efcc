"""Network partitions (a cut TCP link in both directions): clean errors, no corruption, and
automatic recovery when the link heals."""

import random

import pytest
import requests

from kubegfs.errors import KubegfsError
from kubegfs.local import LocalCluster
from kubegfs_dev.netfault import FaultyLink
from kubegfs_dev.util import bearer, wait_for

CHUNK = 256 * 1024


@pytest.fixture
def partitioned(tmp_path):
    cl = LocalCluster(tmp_path / "k", 4, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.0)
    links = []
    for p in cl.chunkservers:
        to_master = FaultyLink(cl.master.host, cl.master.port)
        to_cs = FaultyLink(p.host, p.port)
        p.master_url, p.advertise = to_master.url, to_cs.url
        links.append((p, to_master, to_cs))
    cl.start()
    yield cl, links
    cl.stop()
    for _p, a, b in links:
        a.close()
        b.close()


def alive(c):
    return sum(1 for x in c.chunkservers() if x["alive"])


def test_partitioned_chunkserver_misses_writes_then_rejoins_without_stale_data(partitioned):
    cl, links = partitioned
    c = cl.client()
    body = random.Random(3).randbytes(CHUNK + 100)
    c.put("/f", body)
    victim, to_master, to_cs = next(link for link in links
                                    if link[0].advertise in {r["address"] for r in c.layout("/f")["chunks"][-1]["replicas"]})
    to_master.cut()
    to_cs.cut()
    wait_for(lambda: alive(c) == 3, timeout=20, what="the partitioned chunkserver to be declared dead")
    c.put("/f", b"appended while partitioned", append=True)  # the victim's copy of the last chunk goes stale
    c.put("/g", b"new while partitioned")
    assert c.get("/f") == body + b"appended while partitioned"
    to_master.heal()
    to_cs.heal()
    wait_for(lambda: alive(c) == 4 and c.status()["under_replicated"] == 0, timeout=30, what="rejoin and heal")
    # every replica of every chunk now has the latest bytes: read each one directly
    lay = c.layout("/f")
    for i, ch in enumerate(lay["chunks"]):
        want = (body + b"appended while partitioned")[i * CHUNK:(i + 1) * CHUNK]
        for rep in ch["replicas"]:
            r = requests.get(f"{rep['address']}/internal/chunks/{ch['handle']}", headers=bearer(c.token), timeout=30,
                        params={"offset": 0, "length": len(want), "version": ch["version"]})
            assert r.status_code == 200 and r.content == want, rep


def test_master_cut_off_from_all_chunkservers_fails_cleanly_and_recovers(partitioned):
    cl, links = partitioned
    c = cl.client()
    c.put("/before", b"x")
    for _p, to_master, to_cs in links:
        to_master.cut()
        to_cs.cut()
    wait_for(lambda: alive(c) == 0, timeout=20, what="all chunkservers dead")
    before = c.dump()
    with pytest.raises(KubegfsError) as ei:
        c.put("/during", b"y")
    assert ei.value.status == 503 and "no live chunkserver" in ei.value.message
    with pytest.raises(KubegfsError) as ei:
        c.get("/before")
    assert ei.value.status == 503
    assert c.dump()["tree"] == before["tree"]
    for _p, to_master, to_cs in links:
        to_master.heal()
        to_cs.heal()
    wait_for(lambda: alive(c) == 4, timeout=30, what="rejoin")
    c.put("/after", b"z")
    assert c.get("/before") == b"x" and c.get("/after") == b"z"
