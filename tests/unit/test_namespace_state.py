"""The namespace and the master state machine, without servers."""

import random

import pytest

from kubegfs import namespace as ns
from kubegfs.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from kubegfs.master.checkpoint import decode_checkpoint, dump, encode_checkpoint
from kubegfs.master.state import MasterState

CS = 1 << 20


def st_new():
    s = MasterState(CS, 3)
    s.apply({"op": "init", "chunk_size": CS, "replication": 3, "seq": 1})
    s.apply({"op": "incarnation", "n": 1, "seq": 2})
    return s


class Log:
    """Applies ops to a state and remembers them, like the server does."""

    def __init__(self):
        self.state = st_new()
        self.ops = [{"op": "init", "chunk_size": CS, "replication": 3, "seq": 1},
                    {"op": "incarnation", "n": 1, "seq": 2}]

    def do(self, op):
        op["seq"] = self.state.seq + 1
        self.state.apply(op)
        self.ops.append({k: v for k, v in op.items() if not k.startswith("_")})
        return op

    def put(self, path, size, nchunks=1):
        hs = [self.state.new_handle() for _ in range(nchunks)]
        return self.do({"op": "commit", "path": path, "size": size, "chunks": hs,
                        "new": [[h, 1] for h in hs], "mode": 0o644, "mtime": 1})

    def commit_snapshot(self, sid):
        """Build the record of a captured snapshot from its pin and commit it, as the server does."""
        from kubegfs.snapobj import build_record

        rec = build_record({"id": sid}, self.state.pins[sid].node, self.state.version.__getitem__)
        c = rec.counts
        self.do({"op": "snap_commit", "id": sid, "sha256": rec.sha256, "record_bytes": len(rec.data),
                 "holders": [], "files": c["files"], "dirs": c["dirs"], "chunks": c["chunks"],
                 "logical_bytes": c["bytes"], "duration_seconds": 0.1, "handles_z": rec.handles_z})
        return rec

    def replay(self):
        s = MasterState(CS, 3)
        for op in self.ops:
            s.apply(dict(op))
        return s


def test_persistent_tree_old_root_unchanged():
    r0 = ns.empty_root()
    r1 = ns.mkdir(r0, ("a",), 1, 0o755, False)
    r2 = ns.replace(r1, ("a", "f"), ns.File(3, 1, 0o644, (7,)), 2)
    assert ns.get(r0, ("a",)) is None
    assert ns.get(r1, ("a", "f")) is None
    assert ns.get(r2, ("a", "f")).chunks == (7,)
    r3 = ns.replace(r2, ("a", "f"), None, 3)
    assert ns.get(r2, ("a", "f")) is not None and ns.get(r3, ("a", "f")) is None


def test_mkdir_errors():
    r = ns.mkdir(ns.empty_root(), ("a", "b"), 1, 0o755, True)
    with pytest.raises(AlreadyExists):
        ns.mkdir(r, ("a",), 1, 0o755, False)
    assert ns.mkdir(r, ("a",), 1, 0o755, True) is r
    with pytest.raises(NotFound):
        ns.mkdir(r, ("x", "y"), 1, 0o755, False)
    r = ns.replace(r, ("a", "f"), ns.File(0, 1, 0o644, ()), 1)
    with pytest.raises(InvalidArgument):
        ns.mkdir(r, ("a", "f", "g"), 1, 0o755, True)


def test_prepare_validates_without_changing_state():
    L = Log()
    s = L.state
    L.do(s.prepare_mkdir("/a"))
    before = dump(s)
    for bad in (lambda: s.prepare_mkdir("/a"), lambda: s.prepare_mkdir("/x/y"),
                lambda: s.prepare_rm("/nope"), lambda: s.prepare_rm("/"),
                lambda: s.prepare_mv("/a", "/a/b"), lambda: s.prepare_mv("/zz", "/b"),
                lambda: s.prepare_mkdir("/a/../b"), lambda: s.prepare_mkdir("/q", mode=0o77777)):
        with pytest.raises((InvalidArgument, NotFound, AlreadyExists, Conflict)):
            bad()
    assert dump(s) == before


def test_rm_non_empty_needs_recursive():
    L = Log()
    L.do(L.state.prepare_mkdir("/a/b", parents=True))
    with pytest.raises(Conflict):
        L.state.prepare_rm("/a")
    L.do(L.state.prepare_rm("/a", recursive=True))
    assert ns.get(L.state.root, ("a",)) is None


def test_snapshot_capture_is_point_in_time_and_shares_chunks():
    L = Log()
    s = L.state
    L.do(s.prepare_mkdir("/d"))
    L.put("/d/f", 10)
    h = ns.get(s.root, ("d", "f")).chunks[0]
    assert not s.is_shared(h)
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/d", "created": 5, "copies": 2})
    pinned = s.pins["s1"].node
    # pending snapshot: chunks born before it count as shared even before refs are counted
    assert s.is_shared(h)
    L.put("/d/g", 20)
    g = ns.get(s.root, ("d", "g")).chunks[0]
    assert not s.is_shared(g)  # born after the capture
    assert ns.get(pinned, ("g",)) is None  # the pinned view does not see it
    L.do({"op": "rm", "path": "/d/f", "mtime": 9})
    assert h in s.version and h in s.protected  # unreferenced but protected by the pending snapshot
    L.commit_snapshot("s1")
    assert s.snap[h] == 1 and h not in s.protected and h in s.version
    assert dump(L.replay()) == dump(s)
    L.do({"op": "snap_delete", "id": "s1"})
    assert h not in s.version and h in s.garbage  # GC frees it once nothing refers to it
    assert dump(L.replay()) == dump(s)


def test_cow_moves_file_to_clone_and_keeps_original_for_snapshot():
    L = Log()
    s = L.state
    L.do(s.prepare_mkdir("/d"))
    L.put("/d/f", 10)
    h = ns.get(s.root, ("d", "f")).chunks[0]
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/d", "created": 5, "copies": 2})
    new = s.new_handle()
    L.do({"op": "cow", "path": "/d/f", "index": 0, "old": h, "new": new})
    assert ns.get(s.root, ("d", "f")).chunks == (new,)
    assert ns.get(s.pins["s1"].node, ("f",)).chunks == (h,)
    assert h in s.version and s.version[new] == s.version[h]
    assert not s.is_shared(new) and s.cow_clones == 1


def test_restore_inplace_and_new_adjust_refcounts():

    L = Log()
    s = L.state
    L.do(s.prepare_mkdir("/d"))
    L.put("/d/f", 10)
    h = ns.get(s.root, ("d", "f")).chunks[0]
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/d", "created": 5, "copies": 2})
    rec = L.commit_snapshot("s1")
    L.put("/d/f", 99)  # overwrite: f now has a new chunk; h survives for the snapshot
    assert s.live.get(h, 0) == 0 and s.snap[h] == 1
    L.do({"op": "restore", "id": "s1", "path": "/copy", "mode": "new", "blob": rec.data, "mtime": 7})
    assert s.live[h] == 1 and ns.get(s.root, ("copy", "f")).size == 10
    L.do({"op": "restore", "id": "s1", "path": "/d", "mode": "inplace", "blob": rec.data, "mtime": 8})
    assert s.live[h] == 2 and ns.get(s.root, ("d", "f")).size == 10
    assert len(s.version) == 1  # the overwrite's chunk was freed by the in-place restore
    assert s.is_shared(h)
    assert dump(L.replay()) == dump(s)


def test_checkpoint_roundtrip_equals_state():
    L = Log()
    s = L.state
    rng = random.Random(1)
    L.do(s.prepare_mkdir("/a/b/c", parents=True))
    for i in range(200):
        L.put(f"/a/b/f{i}", rng.randrange(1, 5 * CS), nchunks=rng.randrange(1, 4))
    L.do({"op": "mv", "src": "/a/b", "dst": "/a/bb", "mtime": 3})
    L.do({"op": "rm", "path": "/a/bb/f7", "mtime": 4})
    data = encode_checkpoint(s.checkpoint_view())
    s2 = decode_checkpoint(data)
    assert dump(s2) == dump(s)
    assert dump(L.replay()) == dump(s)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    from kubegfs.errors import CorruptData
    with pytest.raises(CorruptData):
        decode_checkpoint(bytes(bad))


def test_a_recovered_chunk_table_holds_no_copy_of_the_handles_and_modes_files_hold():
    """Memory per file: the chunk tables are keyed by the int objects the files hold, and files
    of one mode share one int object (0o644 is not one of the small ints Python shares)."""
    L = Log()
    s = L.state
    L.do(s.prepare_mkdir("/d"))
    for i in range(20):
        L.put(f"/d/f{i}", 10 + i, nchunks=1 + i % 3)
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/d", "created": 5, "copies": 2})
    L.commit_snapshot("s1")
    L.put("/d/f0", 99)  # f0's old chunk is held by the snapshot alone now
    s2 = decode_checkpoint(encode_checkpoint(s.checkpoint_view()))
    assert dump(s2) == dump(s)
    files = [n for _p, n in ns.walk(s2.root) if isinstance(n, ns.File)]
    held = {id(h) for f in files for h in f.chunks}
    for table in (s2.version, s2.live):
        assert {id(h) for h in table if h in s2.live} == held
    assert len(s2.version) == len(s2.live) + 1 and len(s2.snap) == len(s2.version) - 1  # f0's new chunk
    assert len({f.mode for f in files}) == 1 and len({id(f.mode) for f in files}) == 1
    # no birth epoch is kept (all are older than any capture to come), and sharing answers alike
    assert s2.born == {} and s.born
    L.put("/d/g", 5)  # born in the checkpoint's epoch (not in it: written after)
    s3 = decode_checkpoint(encode_checkpoint(s.checkpoint_view()))
    L.do({"op": "snap_capture", "id": "s2", "name": "two", "path": "/d", "created": 6, "copies": 2})
    cap = dict(L.ops[-1])
    s3.apply(cap)
    L.put("/d/h", 6)  # born after that capture: not shared
    s3.apply(dict(L.ops[-1]))
    assert {h: s.is_shared(h) for h in s.version} == {h: s3.is_shared(h) for h in s3.version}
    assert not s.is_shared(ns.get(s.root, ("d", "h")).chunks[0])
    assert s.is_shared(ns.get(s.root, ("d", "g")).chunks[0])


def test_checkpoint_refused_while_snapshot_pending():
    L = Log()
    L.do(L.state.prepare_mkdir("/d"))
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/d", "created": 5, "copies": 2})
    with pytest.raises(Conflict):
        L.state.checkpoint_view()


def test_handles_unique_across_incarnations():
    s = st_new()
    a = {s.new_handle() for _ in range(100)}
    s.apply({"op": "incarnation", "n": 2})
    b = {s.new_handle() for _ in range(100)}
    assert not a & b


def test_counters_match_a_full_walk_after_every_kind_of_op():

    L = Log()
    s = L.state

    def check():
        f, d, _r, b = ns.count(s.root)
        assert (s.n_files, s.n_dirs, s.n_bytes) == (f, d, b)

    L.do(s.prepare_mkdir("/a/b/c", parents=True))
    check()
    L.put("/a/b/f", 10)
    L.put("/a/b/f", 25)  # overwrite
    L.put("/a/g", 7)
    check()
    L.do({"op": "snap_capture", "id": "s1", "name": "one", "path": "/a", "created": 5, "copies": 2})
    rec = L.commit_snapshot("s1")
    L.do({"op": "mv", "src": "/a/g", "dst": "/a/b/c/g", "mtime": 3})
    L.do({"op": "rm", "path": "/a/b", "mtime": 4})
    check()
    L.do({"op": "restore", "id": "s1", "path": "/copy", "mode": "new", "blob": rec.data, "mtime": 7})
    check()
    L.do({"op": "restore", "id": "s1", "path": "/a", "mode": "inplace", "blob": rec.data, "mtime": 8})
    check()
    assert dump(L.replay()) == dump(s)
    assert dump(decode_checkpoint(encode_checkpoint(s.checkpoint_view()))) == dump(s)


def test_prepare_open_checks_the_target_without_changing_state():
    lg = Log()
    lg.do(lg.state.prepare_mkdir("/d"))
    lg.put("/d/f", 10)
    before = dump(lg.state)
    for path, mode, err in [("/", "create", InvalidArgument), ("/d", "overwrite", InvalidArgument),
                            ("/d/f", "create", AlreadyExists), ("/d/g", "append", NotFound),
                            ("/nope/f", "create", NotFound), ("/d/f", "truncate", InvalidArgument)]:
        with pytest.raises(err):
            lg.state.prepare_open(path, mode, 0o644)
    with pytest.raises(InvalidArgument):
        lg.state.prepare_open("/d/g", "create", 0o17777)
    path, parts, node = lg.state.prepare_open("/d//f", "append", 0o600)
    assert path == "/d/f" and parts == ("d", "f") and isinstance(node, ns.File) and node.size == 10
    assert lg.state.prepare_open("/d/g", "create", 0o600)[2] is None
    assert dump(lg.state) == before


def test_prepare_commit_validates_the_chunk_list_and_notices_changes():
    lg = Log()
    st = lg.state
    lg.put("/f", 10)
    opened = ns.get(st.root, ("f",))
    base = opened.chunks
    h1, h2 = st.new_handle(), st.new_handle()
    acked = {h1: ["cs1"], h2: ["cs2"]}
    ok = st.validate_commit(CS + 5, [*base, h1], acked, base, {h1: ["cs1"]}, opened, True)
    assert ok == [h1]
    bad = [
        (CS * 3, [*base, h1]),  # size does not fit
        (CS + 5, [h1, h2]),  # does not start with the file's chunks
        (CS + 5, [*base, h2]),  # h2 not placed for this write
        (CS + 5, [*base, h1, h1]),
        (5, list(base)),  # an append cannot shrink
    ]
    for size, handles in bad:
        with pytest.raises(InvalidArgument):
            st.validate_commit(size, handles, acked, base, {h1: ["cs1"]}, opened, True)
    with pytest.raises(InvalidArgument):
        st.validate_commit(CS + 5, [*base, h1], {h1: []}, base, {h1: ["cs1"]}, opened, True)
    op = st.prepare_commit("/f", CS + 5, [*base, h1], [h1], 0o600, opened, None)
    assert op["op"] == "commit" and op["new"] == [[h1, 1]] and op["chunks"] == [*base, h1]
    lg.put("/f", 3)  # another writer replaced the file meanwhile
    with pytest.raises(Conflict):
        st.prepare_commit("/f", CS + 5, [*base, h1], [h1], 0o600, opened, None)
    now = ns.get(st.root, ("f",))
    lg.do({"op": "snap_capture", "id": "s", "name": "s", "path": "/", "created": 1, "copies": 1})
    with pytest.raises(Conflict):  # a pending snapshot shares the chunk appended in place
        st.prepare_commit("/f", 3, list(now.chunks), [], 0o600, now, now.chunks[0])


def test_held_by_follows_every_snapshot_op_and_a_checkpoint():
    """The per-holder index heartbeats use: ready snapshots only, made again after commits,
    holder changes, failures and deletions, and right on a state loaded from a checkpoint."""
    L = Log()
    L.do(L.state.prepare_mkdir("/d"))
    L.put("/d/f", 3)

    def ids(s, cs):
        return sorted(e["id"] for e in s.held_by(cs))

    def commit(sid, holders):
        L.do({"op": "snap_capture", "id": sid, "name": sid, "path": "/d", "created": 5, "copies": 2})
        assert ids(L.state, "a") == sorted(x for x in ["s1", "s2"] if x in L.state.snapshots and x != sid
                                           and any(h["id"] == "a" for h in L.state.snapshots[x]["holders"]))
        L.commit_snapshot(sid)
        L.do({"op": "snap_holders", "id": sid, "holders": [{"id": h} for h in holders]})

    commit("s1", ["a", "b"])
    assert ids(L.state, "a") == ["s1"] and ids(L.state, "b") == ["s1"] and ids(L.state, "c") == []
    commit("s2", ["a", "c"])
    assert ids(L.state, "a") == ["s1", "s2"] and ids(L.state, "c") == ["s2"]
    L.do({"op": "snap_holders", "id": "s1", "holders": [{"id": "b"}, {"id": "c"}]})
    assert ids(L.state, "a") == ["s2"] and ids(L.state, "c") == ["s1", "s2"]
    L.do({"op": "snap_capture", "id": "s3", "name": "s3", "path": "/d", "created": 6, "copies": 1})
    L.do({"op": "snap_fail", "id": "s3", "error": "no chunkserver"})
    assert ids(L.state, "a") == ["s2"]
    loaded = decode_checkpoint(encode_checkpoint(L.state.checkpoint_view()))
    assert ids(loaded, "c") == ["s1", "s2"] and ids(loaded, "b") == ["s1"]
    L.do({"op": "snap_delete", "id": "s2"})
    assert ids(L.state, "a") == [] and ids(L.state, "c") == ["s1"]
    assert ids(L.replay(), "c") == ["s1"]
