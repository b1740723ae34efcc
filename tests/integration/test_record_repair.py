"""The record catalog heals itself: a copy that is missing, truncated or another record's bytes
is dropped from the catalog and re-made from a good copy within 30 s (the scrubber is off here:
heartbeats and reads notice), and a restore whose every copy is bad says so."""

from __future__ import annotations

import signal

import pytest
import requests

from kubegfs.chunkserver.blocks import BlockStore
from kubegfs.errors import Unavailable
from kubegfs_dev.util import (
    block_copies,
    damage_block,
    damage_record,
    stored_record,
    stored_record_bytes,
    wait_for,
)

CHUNK = 64 * 1024


def cs_of(cl, cs_id: str):
    return next(p for p in cl.chunkservers if cs_id.startswith(f"cs-{p.node}-"))


def as_files(cl, cs_id: str, sid: str, body: bytes | None, sha: str = "") -> None:
    """Damage from outside, which heartbeats notice in record files (those earlier versions
    wrote, still read): the chunkserver stopped, its copy of record ``sid`` deleted from its log,
    ``body`` and ``sha`` written as the record's files (none if ``body`` is None), the
    chunkserver started again."""
    p = cs_of(cl, cs_id)
    proc = p.popen
    cl.kill(p, signal.SIGTERM)
    proc.wait(timeout=30)
    assert BlockStore(p.data, 0).delete_record(sid)
    if body is not None:
        (p.data / "records" / f"{sid}.rec").write_bytes(body)
        (p.data / "records" / f"{sid}.sha256").write_text(sha)
    cl.start_chunkserver(p)


def stored_length(cl, cs_id: str, sid: str) -> int | None:
    where = stored_record(cs_of(cl, cs_id).data, sid)
    return None if where is None else where[2]


def metric(cl, name: str) -> float:
    text = requests.get(cl.master_url + "/metrics", headers={"Authorization": f"Bearer {cl.token}"}, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def healthy(c, cl, name: str) -> bool:
    s = c.snapshot_show(name)
    ids = [h["id"] for h in s["holders"]]
    return (len(ids) == 2 and s["live_copies"] == 2
            and all(stored_length(cl, i, s["id"]) == s["record_bytes"] for i in ids))


@pytest.mark.parametrize("damage", ["missing", "truncated", "another record's bytes"])
def test_a_bad_record_copy_is_dropped_and_remade(make_cluster, damage):
    cl = make_cluster(n=3)
    c = cl.client()
    c.mkdir("/d")
    c.put("/d/f", b"x" * 5000)
    c.mkdir("/e")
    c.put("/e/g", b"y" * 7000)
    s = c.snapshot_create("/d", "s", copies=2)
    other = c.snapshot_create("/e", "other", copies=2)
    victim = s["holders"][0]["id"]
    body = stored_record_bytes(cs_of(cl, victim).data, s["id"])
    assert body is not None and len(body) == s["record_bytes"]
    if damage == "missing":
        as_files(cl, victim, s["id"], None)
    elif damage == "truncated":
        as_files(cl, victim, s["id"], body[: s["record_bytes"] // 2], s["sha256"])
    else:  # self-consistent, just not this snapshot's record
        src = next(p for p in cl.chunkservers if stored_record(p.data, other["id"]) is not None)
        as_files(cl, victim, s["id"], stored_record_bytes(src.data, other["id"]), other["sha256"])
    wait_for(lambda: victim not in [h["id"] for h in c.snapshot_show("s")["holders"]], timeout=30,
             interval=0.2, what="the bad copy dropped from the catalog")
    wait_for(lambda: healthy(c, cl, "s"), timeout=30, interval=0.2, what="a good second copy re-made")
    assert metric(cl, "kubegfs_snapshot_record_copies_dropped_total") >= 1
    assert metric(cl, "kubegfs_snapshot_record_repairs_total{result=\"success\"") >= 1
    assert metric(cl, "kubegfs_snapshots_under_copied") == 0
    if damage != "missing":  # the bad bytes do not stay behind under that id
        wait_for(lambda: victim in [h["id"] for h in c.snapshot_show("s")["holders"]]
                 or stored_length(cl, victim, s["id"]) is None, timeout=30, interval=0.2, what="the bad copy deleted")
    c.snapshot_restore("s", to="/r")
    assert c.get("/r/f") == b"x" * 5000
    c.close()


def test_a_restore_whose_every_copy_is_bad_says_so(make_cluster):
    cl = make_cluster(n=3)
    c = cl.client()
    c.mkdir("/d")
    c.put("/d/f", b"x" * 5000)
    s = c.snapshot_create("/d", "s", copies=2)
    # both holders stopped before either copy is damaged: otherwise the master may re-make the
    # first damaged copy from the second before the second is damaged (heartbeats report rot
    # within seconds)
    holders = [cs_of(cl, h["id"]) for h in s["holders"]]
    bodies = [stored_record_bytes(p.data, s["id"]) for p in holders]
    assert all(b is not None for b in bodies)
    procs = [p.popen for p in holders]
    for p in holders:
        cl.kill(p, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=30)
    for p, body in zip(holders, bodies, strict=True):
        assert BlockStore(p.data, 0).delete_record(s["id"])
        (p.data / "records" / f"{s['id']}.rec").write_bytes(body[:100])
        (p.data / "records" / f"{s['id']}.sha256").write_text(s["sha256"])
    for p in holders:
        cl.start_chunkserver(p)
    ids = {h["id"] for h in s["holders"]}

    def heard_again() -> bool:  # alive, and heard from since their restart (not about to be marked dead)
        seen = [x for x in c.chunkservers() if x["id"] in ids]
        return len(seen) == 2 and all(x["alive"] and x["last_seen_seconds_ago"] < 0.5 for x in seen)

    wait_for(heard_again, timeout=30, interval=0.1, what="the restarted holders' heartbeats")
    with pytest.raises(Unavailable) as ei:
        c.snapshot_restore("s", to="/r")
    assert "every record copy of snapshot s is missing or damaged" in ei.value.message
    wait_for(lambda: c.snapshot_show("s")["live_copies"] == 0, timeout=30, interval=0.2, what="catalog")
    assert c.status()["snapshots_under_copied"] == 1
    with pytest.raises(Unavailable) as ei:
        c.snapshot_restore("s", to="/r")
    assert "missing or damaged" in ei.value.message
    c.close()


def test_a_damaged_directory_block_is_read_from_the_other_copy_and_scrubbed(make_cluster):
    cl = make_cluster(n=3)
    c = cl.client()
    for sub in ("a", "b"):
        c.mkdir(f"/d/{sub}", parents=True)
        for i in range(5):
            c.put(f"/d/{sub}/f{i}", sub.encode() * (i + 1))
    s = c.snapshot_create("/d", "s", copies=2)
    victim_id = s["holders"][0]["id"]
    victim = next(p for p in cl.chunkservers if victim_id.startswith(f"cs-{p.node}-"))
    urls = [p.url for p in cl.chunkservers]
    assert block_copies(urls, cl.internal_token, s["root"]) == 2
    assert damage_block(victim.data, bytes.fromhex(s["root"])) == 1
    c.snapshot_restore("s", to="/r")  # whichever copy it reads first, the restore is whole
    assert c.get("/r/b/f4") == b"bbbbb" and c.get("/r/a/f0") == b"a"
    r = requests.post(f"{victim.url}/internal/scrub", headers={"Authorization": f"Bearer {cl.internal_token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert block_copies(urls, cl.internal_token, s["root"]) == 1  # dropped where it rotted
    c.put("/d/b/f4", b"changed")
    s2 = c.snapshot_create("/d", "s2", copies=2)
    assert victim_id in [h["id"] for h in s2["holders"]]  # the previous holders are preferred
    wait_for(lambda: block_copies(urls, cl.internal_token, s2["root"]) == 2, timeout=30, interval=0.2,
             what="both copies of the new snapshot whole")
    c.rm("/d", recursive=True)
    c.snapshot_restore("s2", to="/d")
    assert c.get("/d/a/f2") == b"aaa" and c.get("/d/b/f4") == b"changed"
    c.close()


def test_heartbeats_report_records_as_changes_and_a_stale_report_is_asked_again_in_full(make_cluster):
    cl = make_cluster(n=1)
    h = {"Authorization": f"Bearer {cl.internal_token}"}
    base = {"id": "cs-fake", "address": "http://127.0.0.1:9", "capacity_bytes": 1 << 40, "used_bytes": 0,
            "free_bytes": 1 << 40}

    def beat(**kw):
        r = requests.post(cl.master_url + "/internal/heartbeat", json={**base, **kw}, headers=h, timeout=10)
        assert r.status_code == 200, r.text
        base["cluster_id"] = r.json()["cluster_id"]
        return r.json()

    def listed():
        cs = requests.get(cl.master_url + "/api/v1/chunkservers", headers={"Authorization": f"Bearer {cl.token}"},
                          timeout=5).json()["chunkservers"]
        return next(c["records"] for c in cs if c["id"] == "cs-fake")

    beat(full=True, chunks=[], records=[], records_seq=1)
    got = beat(records=["s-gone", "s-kept"], record_digests={"s-gone": [1, ""], "s-kept": [2, ""]}, records_seq=2)
    assert got["records_delta"] is True and "records_full" not in got
    assert listed() == ["s-gone", "s-kept"]
    got = beat(records_seq=3, records_base=2, records_changed={"s-new": [3, ""]}, records_gone=["s-gone"])
    assert "records_full" not in got and listed() == ["s-kept", "s-new"]
    # none of them is in the catalog: the records the changes named are to be deleted, not the others
    assert set(got["delete_records"]) <= {"s-new", "s-gone"}
    got = beat(records_seq=5, records_base=4, records_changed={"s-other": [4, ""]}, records_gone=[])
    assert got["records_full"] is True and listed() == ["s-kept", "s-new"]  # not the report taken last: nothing taken


def test_a_record_rotted_in_a_holders_log_is_reported_by_its_heartbeats_before_a_scrub(make_cluster):
    """The scrubber runs every ~60 s here; the heartbeats' records pass reads and checks some of
    the log's records every RECORD_SCAN_EVERY beats (2 s), so the rotted copy is dropped and
    re-made well before."""
    cl = make_cluster(n=3)
    c = cl.client()
    c.mkdir("/d")
    c.put("/d/f", b"x" * 5000)
    s = c.snapshot_create("/d", "s", copies=2)
    victim = s["holders"][0]["id"]
    damage_record(cs_of(cl, victim).data, s["id"], s["record_bytes"] // 2)
    wait_for(lambda: victim not in [h["id"] for h in c.snapshot_show("s")["holders"]], timeout=25,
             interval=0.2, what="the rotted copy dropped from the catalog")
    wait_for(lambda: healthy(c, cl, "s"), timeout=30, interval=0.2, what="a good second copy re-made")
    c.snapshot_restore("s", to="/r")
    assert c.get("/r/f") == b"x" * 5000
    c.close()


def test_rot_in_the_middle_of_a_holders_newest_segment_loses_nothing_written_after_it(make_cluster):
    """Three snapshots, three appends in each holder's newest segment; the first one's record
    rots while the holder is down. At its start the later appends are kept (not cut off as a
    torn tail would be): their records and blocks are still there, and only the damaged copy is
    re-made."""
    cl = make_cluster(n=2)
    c = cl.client()
    snaps = []
    for name in ("s", "t", "u"):
        c.mkdir(f"/{name}/sub", parents=True)
        c.put(f"/{name}/sub/f", name.encode() * 100)
        snaps.append(c.snapshot_create(f"/{name}", name, copies=2))
    s, t, u = snaps
    p = cs_of(cl, s["holders"][0]["id"])
    victim = s["holders"][0]["id"]
    proc = p.popen
    cl.kill(p, signal.SIGTERM)
    proc.wait(timeout=30)
    damage_record(p.data, s["id"], s["record_bytes"] // 2)
    cl.start_chunkserver(p)
    urls = [q.url for q in cl.chunkservers]
    wait_for(lambda: victim not in [h["id"] for h in c.snapshot_show("s")["holders"]]
             or stored_length(cl, victim, s["id"]) == s["record_bytes"], timeout=30, interval=0.2,
             what="the damaged copy reported")
    for later in (t, u):  # written after the rot: kept, whole
        assert stored_length(cl, victim, later["id"]) == later["record_bytes"]
        assert victim in [h["id"] for h in c.snapshot_show(later["name"])["holders"]]
        assert block_copies(urls, cl.internal_token, later["root"]) == 2
    assert not list((p.data / "blocks").glob("*.corrupt-*"))  # nothing cut
    wait_for(lambda: healthy(c, cl, "s"), timeout=30, interval=0.2, what="the damaged copy re-made")
    for snap in snaps:
        c.snapshot_restore(snap["name"], to=f"/r-{snap['name']}")
        assert c.get(f"/r-{snap['name']}/sub/f") == snap["name"].encode() * 100
    c.close()
