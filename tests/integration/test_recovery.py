"""Losing the master's volume loses nothing: cluster identity, safe mode, `kubegfs master recover`."""

import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from kubegfs.errors import KubegfsError
from kubegfs.local import LocalCluster
from kubegfs_dev.util import wait_for as _wait_for

CHUNK = 256 * 1024


def wait_for(pred, timeout=20.0, what="condition"):
    return _wait_for(pred, timeout=timeout, interval=0.1, what=what)


def on_disk(cluster):
    """Every chunk file, record file and segment of the log of blocks and records on every
    chunkserver: name -> bytes."""
    out = {}
    for p in cluster.chunkservers:
        for f in [*p.data.glob("chunks/*/*.chk"), *p.data.glob("records/*.rec"), *p.data.glob("blocks/*.log")]:
            out[f"{p.name}/{f.name}"] = f.read_bytes()
    return out


def settled_on_disk(cluster):
    """on_disk() once every chunk has all its replicas: a put that reached only two replicas
    under load is healed by re-replication, which would otherwise add a file after the snapshot."""
    c = cluster.client()
    wait_for(lambda: c.status()["under_replicated"] == 0, what="every chunk fully replicated")
    return on_disk(cluster)


def metric(url, token, name):
    text = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def populate(c, seed=7):
    rnd = random.Random(seed)
    files = {"/data/a": rnd.randbytes(3 * CHUNK + 17), "/data/sub/b": rnd.randbytes(1000), "/data/empty": b""}
    c.mkdir("/data/sub", parents=True)
    for path, body in files.items():
        c.put(path, body)
    snap = c.snapshot_create("/data", "before-loss", copies=2)
    c.put("/data/a", b"changed after the snapshot")
    c.put("/other", rnd.randbytes(CHUNK))
    return files, snap


def lose_master_volume(cluster):
    cluster.kill(cluster.master, signal.SIGKILL)
    shutil.rmtree(cluster.master.data)
    cluster.start_master()


def test_lost_master_volume_deletes_nothing_and_refuses_clearly(cluster):
    c = cluster.client()
    populate(c)
    before = settled_on_disk(cluster)
    lose_master_volume(cluster)
    c2 = cluster.client()
    wait_for(lambda: len(c2.status()["cluster"]["foreign_chunkservers"]) == 3, what="all chunkservers refused")
    st = c2.status()
    assert st["cluster"]["refusing"] and st["chunkservers"]["alive"] == 0
    assert {"type": "ClusterIdentity", "status": "False"}.items() <= st["conditions"][0].items()
    with pytest.raises(KubegfsError, match="kubegfs master recover") as ei:
        c2.mkdir("/x")
    assert ei.value.status == 503
    assert metric(cluster.master_url, cluster.token, "kubegfs_master_refusing") == 1
    # a restart of the empty master keeps refusing; heartbeats keep coming; nothing is deleted
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.start_master()
    wait_for(lambda: len(cluster.client().status()["cluster"]["foreign_chunkservers"]) == 3, what="refused again")
    assert cluster.client().status()["cluster"]["refusing"]
    assert on_disk(cluster) == before
    assert "kubegfs master recover" in cluster.master.log_path.read_text()
    cs = cluster.chunkservers[0]
    assert "refused by the master" in cs.log_path.read_text()
    assert metric(cs.url, cluster.token, "kubegfs_chunkserver_cluster_refusals_total") > 0
    assert requests.get(cs.url + "/readyz", timeout=5).status_code == 503


def test_recover_from_records_restores_every_snapshot_byte_identically(cluster):
    c = cluster.client()
    files, snap = populate(c)
    c.mkdir("/deep/er", parents=True)
    c.put("/deep/er/f", b"deep")
    deep = c.snapshot_create("/deep/er", "deep", copies=1)
    lose_master_volume(cluster)
    c2 = cluster.client()
    wait_for(lambda: len(c2.status()["cluster"]["foreign_chunkservers"]) == 3, what="all chunkservers refused")
    out = subprocess.run([sys.executable, "-m", "kubegfs", "master", "recover", "--from", "records",
                          "--master", cluster.master_url, "--token", cluster.token, "-o", "yaml"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["source"] == "records"  # -o as on every command that prints an object
    wait_for(lambda: c2.status()["chunkservers"]["alive"] == 3, what="chunkservers accepted again")
    st = c2.status()
    assert not st["cluster"]["refusing"] and st["cluster"]["cluster_id"] == c2.status()["cluster"]["cluster_id"]
    got = {e["name"]: e for e in c2.snapshot_list()}
    assert set(got) == {"before-loss", "deep"}
    for want, name in ((snap, "before-loss"), (deep, "deep")):
        e = got[name]
        assert (e["id"], e["path"], e["sha256"], e["created"], e["files"]) == \
               (want["id"], want["path"], want["sha256"], want["created"], want["files"])
    c2.snapshot_restore("before-loss")
    for path, body in files.items():
        assert c2.get(path) == body
    c2.snapshot_restore("deep", to="/deep/copy")
    assert c2.get("/deep/copy/f") == b"deep"
    # safe mode ends, garbage (the chunks of files outside every snapshot) goes, snapshots stay whole
    wait_for(lambda: not c2.status()["cluster"]["safe_mode"]["on"], what="safe mode to end")
    c2.put("/new", b"n" * (CHUNK + 1))  # new handles never collide with surviving chunks
    assert c2.get("/new") == b"n" * (CHUNK + 1)
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.start_master()  # the recovered namespace is durable
    cluster.wait_registered(3)
    c3 = cluster.client()
    assert c3.get("/data/a") == files["/data/a"] and c3.get("/new") == b"n" * (CHUNK + 1)
    r = c3.snapshot_restore("before-loss", to="/again")
    assert r["files"] == 3 and c3.get("/again/sub/b") == files["/data/sub/b"]


def test_recover_refuses_a_master_that_holds_a_namespace(cluster):
    c = cluster.client()
    c.mkdir("/keep")
    with pytest.raises(KubegfsError, match="holds the namespace") as ei:
        c.api("POST", "/admin/recover", json={})
    assert ei.value.status == 409
    with pytest.raises(KubegfsError, match="from must be one of"):
        c.api("POST", "/admin/recover", json={"from": "nowhere"})
    assert c.exists("/keep")


def test_chunkserver_of_another_cluster_is_refused_and_keeps_its_data(tmp_path, make_cluster):
    a = make_cluster(n=3)
    b = LocalCluster(tmp_path / "b", 1, chunk_size=CHUNK, replication=1, heartbeat=0.2, token=a.token)
    # the same credentials (a chart reinstalled with the old Secret): only the cluster id tells
    # them apart; with another internal token the heartbeat would be refused before that (401)
    b.internal_token = a.internal_token
    b.start()
    try:
        cb = b.client()
        cb.put("/mine", b"b's data" * 1000)
        stranger = b.chunkservers[0]
        b.kill(stranger, signal.SIGTERM)
        before = settled_on_disk(b)
        stranger.master_url = a.master_url  # misconfigured: points at cluster a's master
        b.start_chunkserver(stranger)
        ca = a.client()
        wait_for(lambda: ca.status()["cluster"]["foreign_chunkservers"], what="the stranger to be refused")
        st = ca.status()
        assert not st["cluster"]["refusing"] and st["chunkservers"]["alive"] == 3
        assert st["conditions"][0]["reason"] == "ForeignChunkserversRefused"
        ca.put("/still-writable", b"ok")
        assert on_disk(b) == before
        assert "belongs to cluster" in a.master.log_path.read_text()
        assert metric(a.master_url, a.token, "kubegfs_master_cluster_refusals_total") > 0
    finally:
        b.stop()


def test_a_new_master_with_format_starts_over_and_the_old_chunkservers_stay_refused(cluster):
    c = cluster.client()
    c.put("/f", b"x" * 100)
    before = settled_on_disk(cluster)
    old_id = c.status()["cluster"]["cluster_id"]
    lose_master_volume(cluster)
    wait_for(lambda: cluster.client().status()["cluster"]["refusing"], what="refusing")
    cluster.kill(cluster.master, signal.SIGKILL)
    cluster.master_args = ["--format"]
    cluster.start_master()
    c2 = cluster.client()
    st = c2.status()["cluster"]
    assert not st["refusing"] and st["cluster_id"] != old_id
    c2.mkdir("/fresh")  # a working, empty cluster
    wait_for(lambda: len(c2.status()["cluster"]["foreign_chunkservers"]) == 3, what="old chunkservers refused")
    assert on_disk(cluster) == before


def test_safe_mode_holds_deletions_until_the_grace_period(tmp_path):
    cl = LocalCluster(tmp_path / "k", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5)
    cl.start()
    try:
        c = cl.client()
        c.put("/f", b"f" * (2 * CHUNK))
        c.put("/lost", b"l" * 10)
        lost = c.layout("/lost")["chunks"][0]["handle"]
        for p in cl.chunkservers:
            cl.kill(p, signal.SIGTERM)
        cl.kill(cl.master, signal.SIGTERM)
        # while everything is down: one chunk disappears everywhere, an orphan appears on cs1
        for p in cl.chunkservers:
            for f in p.data.glob(f"chunks/*/{lost}.*"):
                f.unlink()
        cs1 = cl.chunkservers[0]
        src = next(cs1.data.glob("chunks/*/*.meta"))
        orphan = "00000f0000000001"
        (cs1.data / "chunks" / orphan[-2:]).mkdir(exist_ok=True)
        for suffix in (".meta", ".chk"):
            shutil.copy(src.with_suffix(suffix), cs1.data / "chunks" / orphan[-2:] / f"{orphan}{suffix}")
        cl.master_args = ["--safe-mode-threshold", "1", "--safe-mode-grace", "4"]
        cl.start()
        st = c.status()["cluster"]["safe_mode"]
        assert st["on"] and st["known_chunks"] == 3
        wait_for(lambda: c.status()["cluster"]["deletions_held"] > 0, what="a deletion to be held")
        assert (cs1.data / "chunks" / orphan[-2:] / f"{orphan}.chk").exists()
        assert metric(cl.master_url, cl.token, "kubegfs_master_safe_mode") == 1
        wait_for(lambda: not c.status()["cluster"]["safe_mode"]["on"], what="grace to pass")
        assert "grace period" in c.status()["cluster"]["safe_mode"]["reason"]
        wait_for(lambda: not (cs1.data / "chunks" / orphan[-2:] / f"{orphan}.chk").exists(),
                 what="the orphan to be deleted once safe mode ended")
        assert c.get("/f") == b"f" * (2 * CHUNK)
    finally:
        cl.stop()


def wait_copies(c, n=2):
    wait_for(lambda: c.status()["metadata_replication"]["in_sync"] >= n, what=f"{n} metadata copies in sync")


@pytest.mark.parametrize(("mode", "tls"), [("sync", False), ("async", False), ("sync", True)])
def test_recover_from_metadata_copies_is_byte_identical(tmp_path, mode, tls):
    """(tls: the copies are shipped and fetched back over verified HTTPS.)"""
    cl = LocalCluster(tmp_path / "k", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5, checkpoint_ops=40, tls=tls)
    cl.master_args = ["--metadata-replication", mode, "--metadata-max-lag", "0.5"]
    cl.start()
    try:
        c = cl.client()
        wait_copies(c)
        zones = {t["zone"] for t in c.status()["metadata_replication"]["targets"] if t["in_sync"]}
        assert len(zones) == 2  # copies in two zones
        streams = {t["stream"] for t in c.status()["metadata_replication"]["targets"] if t["in_sync"]}
        assert streams == {"websocket" if tls else "data-port"}  # a TLS chunkserver has no data port
        files, _snap = populate(c)
        for i in range(60):  # enough ops for checkpoints to be written and shipped
            c.mkdir(f"/many/d{i}", parents=True)
        c.put("/many/last", b"acknowledged last")
        c.snapshot_create("/many", "many", copies=1)
        if mode == "async":  # what was acknowledged more than the lag bound ago is on the copies
            time.sleep(0.6)
            wait_for(lambda: c.status()["metadata_replication"]["lag_seconds"] == 0, what="the copies to catch up")
        want = c.dump()  # sync: no wait, every acknowledged op is on the copies already
        assert c.status()["metadata_replication"]["in_sync"] == 2
        assert any(p.data.joinpath("meta").glob("checkpoint-*.ckpt") for p in cl.chunkservers)
        lose_master_volume(cl)
        c2 = cl.client()
        wait_for(lambda: len(c2.status()["cluster"]["foreign_chunkservers"]) == 3, what="all refused")
        r = c2.api("POST", "/admin/recover", json={})
        assert r["source"] == "metadata" and r["problems"] == [], r
        assert c2.dump() == want
        cl.wait_registered(3)
        assert c2.get("/many/last") == b"acknowledged last" and c2.get("/data/a") == b"changed after the snapshot"
        c2.snapshot_restore("before-loss", to="/back")
        for path, body in files.items():
            assert c2.get(path.replace("/data", "/back", 1)) == body
        wait_copies(c2)  # the recovered master keeps replicating
        c2.put("/after", b"after")
        assert c2.get("/after") == b"after"
    finally:
        cl.stop()


def _writer(c, stop, acked, prefix):
    """mkdirs until told to stop; remembers every acknowledged one."""
    i = 0
    while not stop.is_set():
        try:
            c.mkdir(f"{prefix}/d{i}")
            acked.append(f"{prefix}/d{i}")
        except (KubegfsError, OSError):
            return
        i += 1


def _replicating(tmp_path, checkpoint_ops):
    """A started cluster (sync metadata replication) with its two copies in sync, and a client."""
    cl = LocalCluster(tmp_path / "k", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5, checkpoint_ops=checkpoint_ops)
    try:
        cl.start()
        c = cl.client()
        wait_copies(c)
    except BaseException:
        cl.stop()
        raise
    return cl, c


def _recover_has_every(cl, acked):
    """The master (killed already) loses its volume and is recovered from the copies: every
    acknowledged mkdir is there."""
    shutil.rmtree(cl.master.data)
    cl.start_master()
    c = cl.client()
    wait_for(lambda: len(c.status()["cluster"]["foreign_chunkservers"]) == 3, what="all refused")
    r = c.api("POST", "/admin/recover", json={"from": "metadata"})
    assert r["source"] == "metadata" and r["problems"] == [], r
    missing = [p for p in acked if not c.exists(p)]
    assert not missing, f"{len(missing)} acknowledged mkdirs lost, e.g. {missing[:3]}"


def test_kill_9_during_log_shipping_then_volume_loss_keeps_every_acknowledged_op(tmp_path):
    import threading

    cl, c = _replicating(tmp_path, checkpoint_ops=150)
    try:
        acked: list[str] = []
        for round_ in range(2):
            c.mkdir(f"/w{round_}")
            stop = threading.Event()
            threads = [threading.Thread(target=_writer, args=(cl.client(), stop, acked, f"/w{round_}"))
                       for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            cl.kill(cl.master, signal.SIGKILL)  # mid-stream: batches in flight to the copies
            stop.set()
            for t in threads:
                t.join()
            if round_ == 0:  # a plain restart: the copies may be ahead of or behind the local log
                cl.start_master()
                cl.wait_registered(3)
                c = cl.client()
                wait_copies(c)
        assert len(acked) > 20
        _recover_has_every(cl, acked)
    finally:
        cl.stop()


def test_a_copy_killed_mid_stream_drops_out_acks_go_on_and_it_is_rebuilt(tmp_path):
    import threading

    cl, c = _replicating(tmp_path, checkpoint_ops=200)
    try:
        by_url = {p.url: p for p in cl.chunkservers}
        victim = by_url[c.status()["metadata_replication"]["targets"][0]["address"]]
        c.mkdir("/w")
        acked: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_writer, args=(cl.client(), stop, acked, "/w")) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.7)
            cl.kill(victim, signal.SIGKILL)  # batches on its stream, unanswered
            n = len(acked)
            wait_for(lambda: len(acked) > n + 50, what="acknowledgements to go on without the killed copy")
            st = c.status()["metadata_replication"]
            assert st["in_sync"] >= 1 and victim.url not in {t["address"] for t in st["targets"] if t["in_sync"]}
            cl.start_chunkserver(victim)
            wait_copies(c)  # two copies again (the restarted one or the third chunkserver)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert metric(cl.master_url, cl.token, "kubegfs_master_metadata_copy_failures_total") >= 1
        cl.kill(cl.master, signal.SIGKILL)
        _recover_has_every(cl, acked)
    finally:
        cl.stop()


def test_a_copy_with_an_open_stream_stops_promptly(tmp_path):
    cl, c = _replicating(tmp_path, checkpoint_ops=1000)
    try:
        c.mkdir("/x")
        for p in cl.chunkservers:  # two of them hold the master's streams
            assert p.popen is not None
            t0 = time.monotonic()
            p.popen.terminate()
            assert p.popen.wait(timeout=15) == 0
            assert time.monotonic() - t0 < 10, f"{p.name} took {time.monotonic() - t0:.1f}s to stop"
            p.popen = None
    finally:
        cl.stop()


def test_kill_9_during_recovery_then_recover_again(tmp_path):
    import threading

    cl = LocalCluster(tmp_path / "k", 3, chunk_size=CHUNK, heartbeat=0.2, dead_after=1.5)
    cl.start()
    try:
        c = cl.client()
        wait_copies(c)
        files, _ = populate(c)
        for i in range(300):
            c.mkdir(f"/bulk/d{i}", parents=True)
        want = c.dump()
        before = settled_on_disk(cl)
        cl.kill(cl.master, signal.SIGKILL)
        shutil.rmtree(cl.master.data)
        for delay in (0.0, 0.02, 0.08):
            cl.start_master()
            c = cl.client()
            wait_for(lambda c=c: len(c.status()["cluster"]["foreign_chunkservers"]) == 3, what="all refused")
            t = threading.Thread(target=lambda c=c: _swallow(c.api, "POST", "/admin/recover", json={}))
            t.start()
            time.sleep(delay)
            cl.kill(cl.master, signal.SIGKILL)
            t.join()
            assert on_disk(cl) == before  # whatever the moment, nothing was deleted
            if (cl.master.data / "cluster.json").exists() and '"refusing": null' in (
                    cl.master.data / "cluster.json").read_text():
                break  # that recovery had finished before the kill
        cl.start_master()
        c = cl.client()
        st = c.status()["cluster"]
        if st["refusing"]:
            wait_for(lambda: len(c.status()["cluster"]["foreign_chunkservers"]) == 3, what="all refused")
            c.api("POST", "/admin/recover", json={})
        assert c.dump() == want
        cl.wait_registered(3)
        assert c.get("/data/sub/b") == files["/data/sub/b"]
    finally:
        cl.stop()


def _swallow(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except (KubegfsError, OSError):
        pass
