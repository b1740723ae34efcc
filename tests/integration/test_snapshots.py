"""Snapshots and restores on real master and chunkserver processes."""

import hashlib
import random
import time
import urllib.error
import uuid

import pytest

from kubegfs.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from kubegfs_dev.util import block_copies, damage_block, stored_record, stored_record_bytes

CHUNK = 256 * 1024  # matches conftest.CHUNK


def sha(b):
    return hashlib.sha256(b).hexdigest()


def tree_digest(client, root):
    out = {}
    for e in client.walk(root):
        rel = e["path"][len(root):] or "/"
        out[rel] = ("d",) if e["type"] == "dir" else ("f", e["size"], sha(client.get(e["path"])))
    return out


def fresh(client):
    d = f"/t-{uuid.uuid4().hex[:8]}"
    client.mkdir(d)
    return d


def test_snapshot_mutate_restore_both_ways(client):
    rng = random.Random(7)
    d = fresh(client)
    client.mkdir(f"{d}/sub/deeper", parents=True)
    files = {
        f"{d}/a.bin": rng.randbytes(3 * CHUNK + 17),   # several chunks, partial last
        f"{d}/b.txt": b"hello world\n" * 100,
        f"{d}/sub/c.bin": rng.randbytes(CHUNK),          # exactly one full chunk
        f"{d}/sub/deeper/empty": b"",
        f"{d}/sub/deeper/d.bin": rng.randbytes(5000),
    }
    for p, b in files.items():
        client.put(p, b)
    before = tree_digest(client, d)
    snap = client.snapshot_create(d, f"snap-{d[3:]}")
    assert snap["state"] == "ready" and snap["files"] == 5 and snap["dirs"] == 3
    assert snap["logical_bytes"] == sum(map(len, files.values()))
    assert len(snap["holders"]) == 2
    assert snap["holders"][0]["zone"] != snap["holders"][1]["zone"]
    assert len(snap["sha256"]) == 64

    # mutate every way after the snapshot
    client.put(f"{d}/a.bin", b"tail", append=True)           # COW of the shared last chunk
    client.put(f"{d}/b.txt", b"overwritten")                 # new chunks
    client.rm(f"{d}/sub/c.bin")                              # delete
    client.put(f"{d}/sub/deeper/d.bin", rng.randbytes(CHUNK * 2), append=True)
    client.put(f"{d}/new.txt", b"new")
    client.mv(f"{d}/sub/deeper", f"{d}/moved")
    assert tree_digest(client, d) != before

    r = client.snapshot_restore(snap["name"], to=f"{d}-copy")
    assert r["mode"] == "new" and r["files"] == 5
    assert tree_digest(client, f"{d}-copy") == before
    r = client.snapshot_restore(snap["name"])
    assert r["mode"] == "inplace"
    assert tree_digest(client, d) == before
    # the restored copies are independent, copy-on-write
    client.put(f"{d}-copy/a.bin", b"more", append=True)
    assert client.get(f"{d}/a.bin") == files[f"{d}/a.bin"]
    assert client.get(f"{d}-copy/a.bin") == files[f"{d}/a.bin"] + b"more"
    assert client.status()["cow_clones"] >= 2


def test_many_snapshots_each_stays_point_in_time(client):
    d = fresh(client)
    client.put(f"{d}/log", b"")
    expect = {}
    content = b""
    for i in range(6):
        piece = f"entry {i}\n".encode() * (i * 3000)
        content += piece
        client.put(f"{d}/log", piece, append=True)
        s = client.snapshot_create(d, f"gen{i}-{d[3:]}")
        expect[s["name"]] = content
    for name, want in expect.items():
        target = f"{d}-{name}"
        client.snapshot_restore(name, to=target)
        assert client.get(f"{target}/log") == want, name


def test_snapshot_bad_input_changes_nothing(client):
    d = fresh(client)
    client.put(f"{d}/f", b"x")
    before = client.dump()
    with pytest.raises(NotFound):
        client.snapshot_create(f"{d}/missing", "x1")
    with pytest.raises(InvalidArgument):
        client.snapshot_create("relative/path", "x2")
    with pytest.raises(InvalidArgument):
        client.snapshot_create(f"{d}/../etc", "x3")
    with pytest.raises(InvalidArgument):
        client.snapshot_create(d, "bad name!")
    with pytest.raises(InvalidArgument):
        client.snapshot_create(d, "okname", copies=0)
    with pytest.raises(NotFound):
        client.snapshot_restore("no-such-snapshot")
    with pytest.raises(NotFound):
        client.snapshot_delete("no-such-snapshot")
    assert client.dump() == before
    s = client.snapshot_create(d, f"dup-{d[3:]}")
    with pytest.raises(AlreadyExists):
        client.snapshot_create(d, s["name"])
    with pytest.raises(AlreadyExists):
        client.snapshot_restore(s["name"], to=d)  # target exists
    with pytest.raises(NotFound):
        client.snapshot_restore(s["name"], to="/no/parent/here")


def test_snapshot_id_is_idempotent(client):
    d = fresh(client)
    client.put(f"{d}/f", b"x")
    sid = f"uid-{uuid.uuid4()}"
    a = client.snapshot_create(d, f"idem-{d[3:]}", id=sid)
    b = client.snapshot_create(d, f"idem-{d[3:]}", id=sid)
    assert a["id"] == b["id"] == sid
    assert sum(1 for s in client.snapshot_list() if s["id"] == sid) == 1
    with pytest.raises(Conflict):
        client.snapshot_create(d, "another-name", id=sid)


def test_delete_snapshot_releases_chunks_to_gc(shared_cluster, client):
    d = fresh(client)
    client.put(f"{d}/f", random.randbytes(CHUNK + 10))
    s = client.snapshot_create(d, f"gc-{d[3:]}")
    client.rm(f"{d}/f")
    chunks_with_snapshot = client.status()["chunks"]
    client.snapshot_delete(s["name"])
    assert client.status()["chunks"] == chunks_with_snapshot - 2
    with pytest.raises(NotFound):
        client.snapshot_show(s["name"])
    # the record is gone from its holders and the chunks from the chunkservers (heartbeat GC)
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recs = [r for c in client.chunkservers() for r in c["records"]]
        if s["id"] not in recs:
            break
        time.sleep(0.1)
    assert s["id"] not in recs


def test_restore_with_id_is_idempotent(client):
    d = fresh(client)
    client.put(f"{d}/f", b"v1")
    s = client.snapshot_create(d, f"ridem-{d[3:]}")
    client.put(f"{d}/f", b"v2")
    rid = f"r-{uuid.uuid4().hex}"
    a = client.snapshot_restore(s["name"], id=rid)
    assert client.get(f"{d}/f") == b"v1"
    client.put(f"{d}/f", b"v3")
    b = client.snapshot_restore(s["name"], id=rid)  # a retried call must not restore again
    assert b.get("repeated") is True and b["files"] == a["files"]
    assert client.get(f"{d}/f") == b"v3"
    # the same id for another snapshot or another target is a mistake, not a retry
    other = client.snapshot_create(d, f"ridem2-{d[3:]}")
    before = client.dump()
    with pytest.raises(Conflict):
        client.snapshot_restore(other["name"], id=rid)
    with pytest.raises(Conflict):
        client.snapshot_restore(s["name"], to=f"{d}-elsewhere", id=rid)
    assert client.dump() == before


def test_ls_pages_through_a_big_directory_in_order(client):
    d = fresh(client)
    names = [f"f{i:05d}" for i in range(2500)]
    for n in reversed(names):
        client.mkdir(f"{d}/{n}")
    seen = []
    after = ""
    while True:
        page = client.api("GET", "/fs/ls", params={"path": d, "after": after, "limit": 1000})
        seen += [e["path"].rsplit("/", 1)[1] for e in page["entries"]]
        if not page["next"]:
            break
        after = page["next"]
    assert seen == names
    client.mkdir(f"{d}/f00000a")  # the directory changed: a fresh listing includes it, in order
    assert [e["path"].rsplit("/", 1)[1] for e in client.ls(d)][:2] == ["f00000", "f00000a"]


def test_diff_between_snapshots_and_against_the_live_tree(client):
    d = fresh(client)
    client.mkdir(f"{d}/keep/deep", parents=True)
    for i in range(20):
        client.put(f"{d}/keep/deep/f{i}", b"x" * i)
    client.put(f"{d}/old.txt", b"old content")
    client.put(f"{d}/gone", b"bye")
    client.mkdir(f"{d}/other")
    for i in range(20):
        client.put(f"{d}/other/g{i}", b"y")
    a = client.snapshot_create(d, f"diff-a-{d[3:]}")
    assert a["root"] and len(a["root"]) == 64 and a["changes"] == {} and a["format"] == 3
    client.mv(f"{d}/old.txt", f"{d}/new.txt")
    client.rm(f"{d}/gone")
    client.put(f"{d}/made", b"new")
    client.put(f"{d}/keep/deep/f3", b"changed")
    b = client.snapshot_create(d, f"diff-b-{d[3:]}")
    assert b["changes"] == {"since": a["name"], "since_id": a["id"], "created": 1, "deleted": 1,
                            "modified": 3, "renamed": 1}
    # only the changed directories' blocks went out (the root's, keep/ and keep/deep/, not other/)
    assert b["shipped_bytes"] < a["shipped_bytes"] and b["format"] == 3
    out = client.snapshot_diff(a["name"], b["name"])
    lines = [(c["kind"], c["path"], c.get("to", "")) for c in out["changes"]]
    assert lines == [("M", ".", ""), ("-", "./gone", ""), ("M", "./keep/deep", ""), ("M", "./keep/deep/f3", ""),
                     ("+", "./made", ""), ("R", "./old.txt", "./new.txt")]
    assert out["summary"]["renamed"] == 1 and out["to"] == b["name"]
    assert client.snapshot_diff(b["name"])["changes"] == []  # nothing changed since b
    client.put(f"{d}/later", b"1")
    live = client.snapshot_diff(b["name"])
    assert [(c["kind"], c["path"]) for c in live["changes"]] == [("M", "."), ("+", "./later")]
    assert live["to"] == "" and live["to_path"] == d
    assert client.snapshot_diff(a["name"], a["name"])["changes"] == []
    with pytest.raises(NotFound):
        client.snapshot_diff("no-such-snapshot")
    with pytest.raises(NotFound):
        client.snapshot_diff(a["name"], "no-such-snapshot")


def test_restore_in_place_reads_only_changed_directories(client):
    d = fresh(client)
    for sub in ("a", "b", "c"):
        client.mkdir(f"{d}/{sub}/deep", parents=True)
        for i in range(5):
            client.put(f"{d}/{sub}/deep/f{i}", f"{sub}{i}".encode())
    before = tree_digest(client, d)
    s = client.snapshot_create(d, f"rip-{d[3:]}")
    client.rm(f"{d}/b/deep/f2")
    client.put(f"{d}/b/deep/f3", b"overwritten")
    r = client.snapshot_restore(s["name"])
    assert tree_digest(client, d) == before
    # the snapshot's tree is still in this master's memory: it is swapped in, and the op carries
    # the edits that make the live tree it (f2 back, f3's old content, b/deep's mtime), no block
    assert r["edits"] == 3 and r["blocks_used"] == 0 and r["blocks_fetched"] == 0
    assert r["files"] == 15
    r = client.snapshot_restore(s["name"])  # nothing differs: nothing read but the record
    assert r["edits"] == r["blocks_used"] == r["blocks_fetched"] == 0 and tree_digest(client, d) == before
    r = client.snapshot_restore(s["name"], to=f"{d}-new")
    assert tree_digest(client, f"{d}-new") == before
    client.put(f"{d}-new/a/deep/f0", b"x", append=True)  # copy-on-write: the original is untouched
    assert client.get(f"{d}/a/deep/f0") == b"a0"


def test_deleting_a_snapshot_keeps_the_blocks_another_still_reaches(shared_cluster, client):
    d = fresh(client)
    client.mkdir(f"{d}/shared")
    client.mkdir(f"{d}/hot")
    for i in range(10):
        client.put(f"{d}/shared/s{i}", b"s" * i)
    client.put(f"{d}/hot/h", b"1")
    a = client.snapshot_create(d, f"gc-a-{d[3:]}")
    client.put(f"{d}/hot/h", b"2")
    b = client.snapshot_create(d, f"gc-b-{d[3:]}")
    shared = client.snapshot_diff(a["name"], b["name"])
    assert [c["path"] for c in shared["changes"]] == ["./hot", "./hot/h"]
    before = tree_digest(client, d)
    client.snapshot_delete(a["name"])
    deadline = time.monotonic() + 20
    while block_copies([p.url for p in shared_cluster.chunkservers], shared_cluster.internal_token, a["root"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert block_copies([p.url for p in shared_cluster.chunkservers], shared_cluster.internal_token, a["root"]) == 0  # a's own root went
    assert block_copies([p.url for p in shared_cluster.chunkservers], shared_cluster.internal_token, b["root"]) == 2
    client.rm(d, recursive=True)
    client.snapshot_restore(b["name"], to=d)  # b still has every block, shared/ included
    assert tree_digest(client, d) == before


def test_a_snapshot_of_a_single_file_is_a_format_2_record(client):
    d = fresh(client)
    client.put(f"{d}/only", b"just me")
    s = client.snapshot_create(f"{d}/only", f"file-{d[3:]}")
    assert s["format"] == 2 and s["files"] == 1 and s["root"] == ""
    client.put(f"{d}/only", b"changed")
    client.snapshot_restore(s["name"], to=f"{d}/back")
    assert client.get(f"{d}/back") == b"just me"
    client.snapshot_restore(s["name"])
    assert client.get(f"{d}/only") == b"just me"


def _damage_block(cluster, hex_digest):
    """Flip a byte of block ``hex_digest`` in every chunkserver's block log (as if it had rotted)."""
    return sum(damage_block(p.data, bytes.fromhex(hex_digest)) for p in cluster.chunkservers)


def test_a_small_change_ships_deltas_and_a_holder_without_the_base_gets_blocks_whole(make_cluster, monkeypatch):
    # holders without their cache of recent blocks: a base is read from its pack (and found damaged)
    monkeypatch.setenv("KUBEGFS_BLOCK_CACHE", "0")
    cl = make_cluster()
    client = cl.client()
    d, names, a, b, after_b = _two_snapshots_of_a_big_directory(client)
    assert _damage_block(cl, b["root"]) == 2  # the base of c's root block
    client.put(names[41], b"changed too")
    c = client.snapshot_create(d, f"delta-c-{d[3:]}")
    assert c["state"] == "ready" and c["shipped_bytes"] > b["shipped_bytes"]  # sent whole instead
    assert "refused block deltas" in cl.master.log_path.read_text()
    urls = [p.url for p in cl.chunkservers]
    assert block_copies(urls, cl.internal_token, c["root"]) == 2
    after_c = tree_digest(client, d)
    for s, want in ((b, after_b), (c, after_c)):
        client.snapshot_restore(s["name"], to=f"{d}-{s['name']}")
        assert tree_digest(client, f"{d}-{s['name']}") == want
    client.close()


def _two_snapshots_of_a_big_directory(client):
    d = fresh(client)
    client.mkdir(f"{d}/big")
    for i in range(80):  # a directory of several sub-blocks
        client.put(f"{d}/big/file-{i:03d}-{random.getrandbits(32):08x}", b"x")
    names = sorted(e["path"] for e in client.walk(f"{d}/big") if e["type"] == "file")
    a = client.snapshot_create(d, f"delta-a-{d[3:]}")
    client.put(names[40], b"changed")
    b = client.snapshot_create(d, f"delta-b-{d[3:]}")
    # the big directory's changed leaf, its head and the root, each as a delta against a's
    assert b["shipped_bytes"] - b["record_bytes"] < 400 < a["shipped_bytes"] - a["record_bytes"]
    return d, names, a, b, tree_digest(client, d)


def test_a_base_held_in_memory_takes_deltas_though_its_pack_rotted_and_the_rot_is_caught_when_read(make_cluster):
    # its own cluster: a scrub pass (the first comes ~1 min after start) would drop the rotted
    # block before the next snapshot, and a holder missing a heartbeat on a loaded machine would
    # be replaced by one that gets the blocks whole; either fails the "< 400 bytes" below
    cl = make_cluster(dead_after=30)
    client = cl.client()
    d, names, _a, b, _after_b = _two_snapshots_of_a_big_directory(client)
    assert _damage_block(cl, b["root"]) == 2  # on disk; whole and verified in the holders' memory
    client.put(names[41], b"changed too")
    c = client.snapshot_create(d, f"delta-c-{d[3:]}")
    assert c["state"] == "ready" and c["shipped_bytes"] - c["record_bytes"] < 400  # deltas, rebuilt and checked
    after_c = tree_digest(client, d)
    client.snapshot_restore(c["name"], to=f"{d}-c")
    assert tree_digest(client, f"{d}-c") == after_c
    urls = [p.url for p in cl.chunkservers]
    with pytest.raises(urllib.error.HTTPError):  # the rotted copy fails its digest when read from disk
        block_copies(urls, cl.internal_token, b["root"])


def _post_blocks(url, token, body, headers):
    import urllib.error
    import urllib.request

    from kubegfs_dev.util import bearer

    req = urllib.request.Request(f"{url}/internal/blocks/delta", method="POST", data=body,
                                 headers={**bearer(token), **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            import json

            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_a_holder_stores_a_record_sent_after_its_blocks_in_one_request(shared_cluster):
    from kubegfs import blockdelta, merkle

    cs = shared_cluster.chunkservers[0]
    tok = shared_cluster.internal_token
    block = merkle.decode_block  # a real block: an empty directory's head
    import immutables

    from kubegfs import namespace as ns

    d = ns.Dir(immutables.Map(), 5, 0o755)
    dg = merkle.digest(d, lambda h: 1)
    data = merkle.blocks_of_dir(d, lambda h: 1).head
    assert block(data, dg).entries == {}
    body = blockdelta.pack([blockdelta.Outgoing(dg, merkle.compress(data))])
    record = b"a record " + uuid.uuid4().hex.encode()
    sha = hashlib.sha256(record).hexdigest()
    rid = f"s-one-trip-{uuid.uuid4().hex[:8]}"
    hdr = {"X-Kubegfs-Record": rid, "X-Kubegfs-Record-Length": str(len(record)), "X-Kubegfs-Sha256": sha}
    for bad in ({**hdr, "X-Kubegfs-Record-Length": str(len(body) + len(record) + 1)},
                {**hdr, "X-Kubegfs-Record-Length": "x"}, {**hdr, "X-Kubegfs-Sha256": "0" * 63}):
        assert _post_blocks(cs.url, tok, body + record, bad)[0] == 400
    status, _out = _post_blocks(cs.url, tok, body[:-1] + record, hdr)  # a batch that fails its check
    assert status >= 400 and stored_record(cs.data, rid) is None  # no record without its blocks
    status, out = _post_blocks(cs.url, tok, body + record, hdr)
    assert status == 201 and out["stored"] == 1 and out["record"]["sha256"] == sha
    assert stored_record_bytes(cs.data, rid) == record
    assert block_copies([cs.url], tok, dg.hex()) == 1
