"""Recovery from damaged master files, lost disks and corrupt record copies."""

import random
import shutil
import signal

import pytest
import requests

from kubegfs.formats import scan_log
from kubegfs_dev.util import damage_record, stored_record, wait_for

CHUNK = 256 * 1024


def holders(c, name):
    return [h["id"] for h in c.snapshot_show(name)["holders"]]


def cs_of(cluster, cs_id):
    return next(p for p in cluster.chunkservers if cs_id.startswith(f"cs-{p.node}-"))


def test_corrupt_newest_checkpoint_falls_back_to_older_one_plus_log(cluster):
    c = cluster.client()
    c.mkdir("/a")
    c.put("/a/one", b"1")
    c.checkpoint()
    c.put("/a/two", b"2")
    c.checkpoint()
    c.put("/a/three", b"3")
    want = c.dump()
    cluster.kill(cluster.master, signal.SIGKILL)
    newest = sorted(cluster.master.data.glob("checkpoint-*.ckpt"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    newest.write_bytes(bytes(raw))
    cluster.start_master()
    c2 = cluster.client()
    assert c2.dump() == want
    problems = c2.status()["recovery"]["problems"]
    assert any("checkpoint" in p and "corrupt" in p for p in problems), problems


def test_flipped_byte_mid_log_recovers_prefix_loudly(cluster):
    c = cluster.client()
    for i in range(30):
        c.mkdir(f"/d{i:02d}")
    cluster.kill(cluster.master, signal.SIGKILL)
    seg = sorted(cluster.master.data.glob("log-*.wal"))[-1]
    raw = bytearray(seg.read_bytes())
    end = scan_log(bytes(raw), padded=True).good_bytes  # zeros written ahead follow the records
    assert end and not raw[end:].strip(b"\0")
    pos = end * 2 // 3
    raw[pos] ^= 0x01
    seg.write_bytes(bytes(raw))
    cluster.start_master()
    c2 = cluster.client()
    names = [e["path"] for e in c2.ls("/")]
    # a correct prefix: d00..dK with no holes, never a silently different state
    assert names == [f"/d{i:02d}" for i in range(len(names))] and 0 < len(names) < 30
    problems = c2.status()["recovery"]["problems"]
    assert problems and ("checksum" in problems[0] or "torn" in problems[0] or "undecodable" in problems[0])
    log = cluster.master.log_path.read_text()
    assert "recovered to the last good record" in log


def test_lost_disk_rereplicates_chunks_and_record_copies(cluster):
    c = cluster.client()
    c.mkdir("/d")
    body = random.Random(2).randbytes(3 * CHUNK)
    c.put("/d/f", body)
    s = c.snapshot_create("/d", "s", copies=2)
    victim = cs_of(cluster, s["holders"][0]["id"])
    cluster.kill(victim, signal.SIGKILL)
    shutil.rmtree(victim.data)  # the disk is gone; it comes back empty with a new identity
    cluster.start_chunkserver(victim)
    wait_for(lambda: not any(x["alive"] for x in c.chunkservers() if x["id"] == s["holders"][0]["id"]),
             what="the old identity to be dead")
    # chunks back to 3 live replicas, record back to 2 live copies
    def healed():
        st = c.status()
        live = {x["id"] for x in c.chunkservers() if x["alive"]}
        return st["under_replicated"] == 0 and len([h for h in holders(c, "s") if h in live]) >= 2
    wait_for(healed, timeout=30, what="re-replication and record repair")
    cluster.kill(next(p for p in cluster.chunkservers if p is not victim), signal.SIGKILL)
    assert c.get("/d/f") == body
    r = c.snapshot_restore("s", to="/copy")
    assert c.get("/copy/f") == body and r["files"] == 1


def test_scrubber_finds_corrupt_record_and_master_recopies(tmp_path):
    from kubegfs.local import LocalCluster

    cl = LocalCluster(tmp_path / "k", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5, scrub_interval=0.5)
    cl.start()
    try:
        c = cl.client()
        c.mkdir("/d")
        c.put("/d/f", b"x" * 1000)
        s = c.snapshot_create("/d", "s", copies=2)
        bad = cs_of(cl, s["holders"][0]["id"])
        damage_record(bad.data, s["id"], 10)
        # the scrubber notices, the master drops that copy and re-copies from the good one
        wait_for(lambda: s["holders"][0]["id"] not in holders(c, "s") and len(holders(c, "s")) == 2,
                 what="record repair")
        wait_for(lambda: stored_record(bad.data, s["id"]) is None, what="corrupt copy deleted")
        m = requests.get(bad.url + "/metrics", headers={"Authorization": f"Bearer {cl.token}"}).text
        assert 'kubegfs_chunkserver_checksum_failures_total{kind="record"}' in m
        # scrubbing also finds a chunk that nobody read
        h = c.layout("/d/f")["chunks"][0]["handle"]
        victim = cl.chunkservers[1]
        path = victim.data / "chunks" / h[-2:] / f"{h}.chk"
        raw = bytearray(path.read_bytes())
        raw[0] ^= 0xFF
        path.write_bytes(bytes(raw))
        wait_for(lambda: not path.exists() or path.read_bytes()[0] != raw[0], what="corrupt chunk replaced")
        wait_for(lambda: c.status()["under_replicated"] == 0, what="heal")
        assert c.get("/d/f") == b"x" * 1000
    finally:
        cl.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    assert r.returncode == 0, f"cannot mount a tmpfs for the disk-full test (needs root): {r.stderr!r}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clean_error_and_recovers(tmp_path, tiny_disk):
    from kubegfs.errors import KubegfsError
    from kubegfs.local import LocalCluster

    cl = LocalCluster(tmp_path / "k", 1, chunk_size=CHUNK, replication=1, heartbeat=0.2)
    cl.chunkservers[0].data = tiny_disk / "cs1"
    cl.start()
    try:
        c = cl.client()
        c.put("/small", b"ok")
        with pytest.raises(KubegfsError) as ei:
            c.put("/big", b"z" * (8 << 20))
        assert "full" in ei.value.message
        assert not c.exists("/big")  # nothing half-written became visible
        assert c.get("/small") == b"ok"
        # space comes back once garbage is collected: the uncommitted chunks are deleted
        wait_for(lambda: _try_put(c, "/after", b"y" * (2 << 20)), timeout=90, what="space back")
        assert c.get("/after") == b"y" * (2 << 20)
    finally:
        cl.stop()


def _try_put(c, path, data):
    from kubegfs.errors import KubegfsError

    try:
        c.put(path, data)
        return True
    except KubegfsError:
        return False


def test_concurrent_writes_never_take_the_free_space_reserve(tiny_disk):
    import threading

    from kubegfs.chunkserver.store import RESERVE, ChunkStore
    from kubegfs.errors import NoSpace

    store = ChunkStore(tiny_disk / "cs", chunk_size=1 << 20)
    start = threading.Barrier(8)
    full = []

    def writer(t: int) -> None:
        start.wait()
        piece = bytes([t]) * (128 << 10)
        try:
            for c in range(100):
                h = (t << 16) | c
                for off in range(0, 1 << 20, len(piece)):
                    store.write(h, off, piece, 1, sync=off + len(piece) == 1 << 20)
        except NoSpace:
            full.append(t)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(full) == 8  # every writer ran into the reserve
    assert store.free_bytes() >= RESERVE - 16 * 1024, store.free_bytes()
