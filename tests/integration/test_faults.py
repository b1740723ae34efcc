"""Crash, corruption and failure handling with real processes (each test gets its own cluster)."""

import random
import signal

import pytest
import requests

from kubegfs import httpconn
from kubegfs.client import read_order
from kubegfs.errors import CorruptData, KubegfsError, Unavailable
from kubegfs.formats import scan_log
from kubegfs_dev.util import damage_record, wait_for

CHUNK = 256 * 1024


def test_master_kill9_loses_nothing_acknowledged(cluster):
    c = cluster.client()
    rng = random.Random(11)
    c.mkdir("/keep/deep", parents=True)
    data = {f"/keep/f{i}": rng.randbytes(rng.randrange(0, 3 * CHUNK)) for i in range(20)}
    for p, b in data.items():
        c.put(p, b)
    c.put("/keep/f0", b"appended", append=True)
    data["/keep/f0"] += b"appended"
    c.mv("/keep/f1", "/keep/deep/f1")
    data["/keep/deep/f1"] = data.pop("/keep/f1")
    c.rm("/keep/f2")
    del data["/keep/f2"]
    s = c.snapshot_create("/keep", "before-crash")
    dump_before = c.dump()
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.start_master()
    c2 = cluster.client()
    assert c2.dump() == dump_before  # identical after op-log replay
    cluster.wait_registered(3)
    for p, b in data.items():
        assert c2.get(p) == b, p
    assert c2.snapshot_show("before-crash")["sha256"] == s["sha256"]
    # checkpoint, crash again: identical after checkpoint load + (empty) replay
    c2.checkpoint()
    c2.put("/keep/after-ckpt", b"x")
    dump2 = c2.dump()
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.start_master()
    c3 = cluster.client()
    assert c3.dump() == dump2
    st = c3.status()
    assert st["recovery"]["checkpoint_seq"] > 0 and st["recovery"]["problems"] == []
    cluster.wait_registered(3)
    c3.snapshot_restore("before-crash", to="/restored")
    for p, b in data.items():
        assert c3.get(p.replace("/keep", "/restored", 1)) == b


def test_torn_oplog_tail_is_dropped_on_restart(cluster):
    c = cluster.client()
    c.mkdir("/a")
    dump_before = c.dump()
    cluster.kill(cluster.master, signal.SIGKILL)
    seg = sorted((cluster.master.data).glob("log-*.wal"))[-1]
    end = scan_log(seg.read_bytes(), padded=True).good_bytes  # the records; zeros follow them
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x40\x00\x00\x00\x12\x34")  # a record header whose body never made it
    cluster.start_master()
    c2 = cluster.client()
    d = c2.dump()
    assert d["tree"] == dump_before["tree"]
    problems = c2.status()["recovery"]["problems"]
    # its body is the zeros written ahead: the checksum does not match them
    assert problems and ("torn" in problems[0] or "checksum" in problems[0])
    assert list(cluster.master.data.glob("log-*.corrupt-*"))  # damaged copy kept for forensics
    c2.mkdir("/b")  # and the log accepts new records after the truncation
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.start_master()
    assert cluster.client().exists("/b")


def test_flipped_byte_in_chunk_fails_over_and_is_repaired(cluster):
    c = cluster.client()
    body = random.Random(5).randbytes(CHUNK + 1000)
    c.put("/f", body)
    lay = c.layout("/f")
    h = lay["chunks"][0]["handle"]
    first = lay["chunks"][0]["replicas"][0]["id"]
    victim = next(p for p in cluster.chunkservers if first.startswith(f"cs-{p.node}-"))
    path = victim.data / "chunks" / h[-2:] / f"{h}.chk"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert c.get("/f") == body  # served from another replica
    assert c.stats.corrupt == 1 and c.stats.failovers == 1
    m = requests.get(victim.url + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"}).text
    assert 'kubegfs_chunkserver_checksum_failures_total{kind="chunk"} 1.0' in m
    # the master learns of it, drops the bad replica and re-replicates to the goal
    def healed():
        reps = c.layout("/f")["chunks"][0]["replicas"]
        return len(reps) == 3 and c.status()["under_replicated"] == 0
    wait_for(healed, what="re-replication of the corrupt replica")
    c3 = cluster.client()
    assert c3.get("/f") == body and c3.stats.corrupt == 0


def test_a_bad_block_mid_piece_ends_the_answer_as_it_arrives_and_the_connection_is_not_reused(make_cluster):
    """A piece big enough to be received slice by slice (httpconn.WAITALL), its blocks checked
    as they arrive: a bad block in the middle ends the answer there (the rest is never read on
    that connection, which is dropped), the same replica's main port answers corrupt, and the
    next piece from that replica's read port is exact."""
    big = 4 * httpconn.WAITALL
    cl = make_cluster(chunk_size=big)
    c = cl.client()
    body = random.Random(7).randbytes(2 * big)
    c.put("/g", body)
    ch0, ch1 = c.layout("/g")["chunks"]
    first = read_order(ch0["replicas"], 0)[0]
    c._req("GET", f"{first['address']}/internal/chunks/{ch0['handle']}",
           params={"offset": 0, "length": 1, "version": ch0["version"]})
    assert first["address"] in c.read_ports
    victim = next(p for p in cl.chunkservers if first["id"].startswith(f"cs-{p.node}-"))
    path = victim.data / "chunks" / ch0["handle"][-2:] / f"{ch0['handle']}.chk"
    raw = bytearray(path.read_bytes())
    raw[5 * httpconn.SLICE + 10] ^= 0x01  # in the sixth slice of the piece
    path.write_bytes(bytes(raw))
    with pytest.raises(KubegfsError) as err:  # this thread's connections: read port, then main port
        c._fetch(first["address"], ch0, 0, big, None)
    assert isinstance(err.value, CorruptData) or err.value.code == "corrupt"
    assert c.stats.mismatches == 1 and first["address"] in c.read_ports
    assert bytes(c._fetch(first["address"], ch1, 0, big, None)) == body[big:]
    assert c.stats.mismatches == 1
    assert c.get("/g") == body


def test_flipped_byte_is_caught_by_the_client_on_a_read_port_and_repaired(cluster):
    """A client-verified read (the chunkserver sends its stored CRCs, the client checks): the
    bad block is never returned; the same replica's main port checks its copy, reports it and
    answers corrupt; the piece comes from another replica; the master re-replicates."""
    c = cluster.client()
    body = random.Random(6).randbytes(CHUNK + 1000)
    c.put("/f", body)
    ch = c.layout("/f")["chunks"][0]
    for r in ch["replicas"]:  # the main ports' answers name the read ports
        c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
               params={"offset": 0, "length": 1, "version": ch["version"]})
    assert len(c.read_ports) == 3
    first = read_order(ch["replicas"], 0)[0]["id"]
    victim = next(p for p in cluster.chunkservers if first.startswith(f"cs-{p.node}-"))
    path = victim.data / "chunks" / ch["handle"][-2:] / f"{ch['handle']}.chk"
    raw = bytearray(path.read_bytes())
    raw[CHUNK - 100] ^= 0x01  # in the chunk's last block
    path.write_bytes(bytes(raw))
    assert c.get("/f") == body
    assert (c.stats.mismatches, c.stats.corrupt, c.stats.failovers) == (1, 1, 1)
    m = requests.get(victim.url + "/metrics", headers={"Authorization": f"Bearer {cluster.token}"}).text
    assert 'kubegfs_chunkserver_checksum_failures_total{kind="chunk"} 1.0' in m

    def healed():
        reps = c.layout("/f")["chunks"][0]["replicas"]
        return len(reps) == 3 and c.status()["under_replicated"] == 0
    wait_for(healed, what="re-replication of the corrupt replica")
    c3 = cluster.client()
    assert c3.get("/f") == body and c3.stats.corrupt == 0


def test_chunkserver_death_rereplication_and_record_fallback(cluster):
    c = cluster.client()
    c.mkdir("/d")
    body = random.Random(9).randbytes(2 * CHUNK + 5)
    c.put("/d/f", body)
    s = c.snapshot_create("/d", "s1", copies=2)
    nearest = s["holders"][0]["id"]
    victim = next(p for p in cluster.chunkservers if nearest.startswith(f"cs-{p.node}-"))
    cluster.kill(victim, signal.SIGKILL)
    assert c.get("/d/f") == body  # reads keep working from other replicas
    wait_for(lambda: c.status()["chunkservers"]["alive"] == 2, what="death detection")
    # a fourth chunkserver joins; the master brings every chunk back to 3 replicas
    extra = cluster.add_chunkserver_spec(3, "zone-a", "region-1", node="node-4")
    cluster.start_chunkserver(extra)
    wait_for(lambda: c.status()["under_replicated"] == 0 and c.status()["chunkservers"]["alive"] == 3,
             timeout=20, what="re-replication")
    # restore works from the other record copy
    r = c.snapshot_restore("s1", to="/copy")
    assert r["source"]["id"] != nearest
    assert c.get("/copy/f") == body


def test_corrupt_record_copy_is_never_restored(cluster):
    c = cluster.client()
    c.mkdir("/d")
    c.put("/d/f", b"precious")
    s = c.snapshot_create("/d", "s1", copies=2)
    for h in s["holders"]:
        p = next(p for p in cluster.chunkservers if h["id"].startswith(f"cs-{p.node}-"))
        damage_record(p.data, s["id"], -3, 0x55)
    before = c.dump()
    with pytest.raises(Unavailable) as ei:
        c.snapshot_restore("s1", to="/copy")
    assert "checksum" in ei.value.message and "every record copy" in ei.value.message
    after = c.dump()
    assert after["tree"] == before["tree"] and not c.exists("/copy")
    # the catalog no longer counts the bad copies (nothing left to re-copy from)
    assert c.snapshot_show("s1")["holders"] == [] and c.status()["snapshots_under_copied"] == 1


def test_write_when_too_few_chunkservers_still_succeeds_and_heals(cluster):
    c = cluster.client()
    cluster.kill(cluster.chunkservers[2], signal.SIGKILL)
    wait_for(lambda: c.status()["chunkservers"]["alive"] == 2, what="death detection")
    c.put("/f", b"two replicas only")
    assert len(c.layout("/f")["chunks"][0]["replicas"]) == 2
    cluster.start_chunkserver(cluster.chunkservers[2])
    wait_for(lambda: len(c.layout("/f")["chunks"][0]["replicas"]) == 3, what="heal")


def test_all_replicas_down_is_a_clear_error(cluster):
    c = cluster.client()
    c.put("/f", b"data")
    for p in cluster.chunkservers:
        cluster.kill(p, signal.SIGKILL)
    with pytest.raises(KubegfsError) as ei:
        c.get("/f")
    assert ei.value.status == 503 and "no replica" in ei.value.message
