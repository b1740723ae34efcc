"""Format-3 snapshots in the state machine (block counts, restore assembly) and the chunkserver's
content-addressed block store, without servers."""

import asyncio
import random
from array import array
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_namespace_state import Log

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.chunkserver import blocklog
from kubegfs.chunkserver.blocks import BlockStore
from kubegfs.errors import CorruptData
from kubegfs.formats import packb
from kubegfs.master import precount
from kubegfs.master.checkpoint import decode_checkpoint, dump, encode_checkpoint
from kubegfs.master.snapshots import Encoded, Snapshots
from kubegfs.master.state import decode_block_infos, encode_block_infos, encode_block_infos_z

NAMES = ["a", "b", "c", "d"]


def dir_block_set(d, v):
    """The digests of a directory's head and sub-blocks."""
    head, parts, *_rest = merkle.dir_blocks(d, v, lambda c: merkle.digest(c, v))
    return {merkle.block_digest(head)} | {p for p, _b in parts}


class BlockLog(Log):
    """The server's format-3 build and restore, against an in-memory holder."""

    def __init__(self):
        super().__init__()
        self.holder: dict[bytes, bytes] = {}
        self.n = 0

    def snapshot(self, path):
        sid = self.capture(path)
        self.commit(sid)
        return sid

    def capture(self, path):
        """A snapshot captured and its blocks on the holder, not committed."""
        self.n += 1
        sid = f"s{self.n}"
        self.do({"op": "snap_capture", "id": sid, "name": sid, "path": path, "created": 1, "copies": 1})
        node = self.state.pins[sid].node
        v = self.state.version.__getitem__
        kept: merkle.Kept = {}
        merkle.digest(node, v, kept)
        for dg, data, _n in merkle.iter_blocks(node, v, lambda d: d in self.holder, kept):
            self.holder[dg] = data
        return sid

    def new_infos(self, sid):
        st = self.state
        return merkle.new_block_infos(st.pins[sid].node, st.version.__getitem__, st.blocks.__contains__)

    def commit(self, sid, infos=None, precounted=False, compressed=True):
        st = self.state
        node = st.pins[sid].node
        v = st.version.__getitem__
        root = merkle.digest(node, v)
        files, dirs, chunks, size = merkle.stats(node, v)
        infos = self.new_infos(sid) if infos is None else infos
        # the server's apply takes its infos as they are; the log (and so the replay) decodes "blocks"
        self.do({"op": "snap_commit", "id": sid, "sha256": "", "record_bytes": 0, "holders": [],
                 "files": files, "dirs": dirs, "chunks": chunks, "logical_bytes": size,
                 "duration_seconds": 0.0, "root": root.hex(),
                 "blocks": (encode_block_infos_z if compressed else encode_block_infos)(infos),
                 "_infos": infos, "_precounted": precounted})

    def restore(self, sid, to=None):
        st = self.state
        e = st.snapshots[sid]
        parts = tuple(p for p in (to or e["path"]).split("/") if p)
        mode = "new" if to else "inplace"
        have: dict[bytes, bytes] = {}
        while True:
            try:
                _tree, used = merkle.assemble(bytes.fromhex(e["root"]), have,
                                              st.restore_candidates(parts, mode, e["path"]), st.version_or_zero)
                break
            except merkle.NeedBlocks as need:
                have.update({d: self.holder[d] for d in need.digests})
        self.do({"op": "restore", "format": 3, "id": sid, "path": "/" + "/".join(parts), "mode": mode,
                 "mtime": 9, "root": e["root"], "source_path": e["path"],
                 "blocks": merkle.pack_frames([(d, have[d]) for d in used]),
                 "counts": {"files": e["files"], "dirs": e["dirs"], "chunks": e["chunks"]}})
        return used


def flat(node):
    return [(p, type(n).__name__, getattr(n, "size", None), getattr(n, "chunks", None), n.mode, n.mtime)
            for p, n in ns.walk(node)]


def mutate(log, rng, n):
    for _ in range(n):
        every = list(ns.walk(ns.must_get(log.state.root, ("t",))))
        dirs = [("t",) + p for p, x in every if isinstance(x, ns.Dir)]
        files = [("t",) + p for p, x in every if isinstance(x, ns.File)]
        op = rng.choice(["put", "put", "rm", "mkdir", "mv"])
        if op == "put" or not files:
            p = rng.choice(dirs) + (rng.choice(NAMES),)
            if not isinstance(ns.get(log.state.root, p), ns.Dir):
                log.put("/" + "/".join(p), rng.randrange(1, 3 * 1024), rng.randrange(0, 3))
        elif op == "rm":
            log.do({"op": "rm", "path": "/" + "/".join(rng.choice(files)), "mtime": 2})
        elif op == "mkdir":
            p = rng.choice(dirs) + (rng.choice(NAMES) + "d",)
            if ns.get(log.state.root, p) is None:
                log.do({"op": "mkdir", "path": "/" + "/".join(p), "parents": False, "mode": 0o755, "mtime": 3})
        else:
            src = rng.choice(files)
            dst = rng.choice(dirs) + (rng.choice(NAMES) + "m",)
            if ns.get(log.state.root, dst) is None:
                log.do({"op": "mv", "src": "/" + "/".join(src), "dst": "/" + "/".join(dst), "mtime": 4})


def check_counts(s):
    """Every counted block's files hold one snapshot reference per chunk reference: ``snap``
    equals the sum over counted blocks (format 3 only here)."""
    want: dict[int, int] = {}
    for b in s.blocks.values():
        for h in merkle._unpack(b.info.handles):
            want[h] = want.get(h, 0) + 1
    assert s.snap == want
    for b in s.blocks.values():
        assert all(c in s.blocks for c in b.info.children)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_restore_gives_the_tree_at_capture_and_replays_identically(rng):
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    mutate(log, rng, 8)
    captured = []
    for _ in range(3):
        sid = log.snapshot("/t")
        captured.append((sid, flat(ns.must_get(log.state.root, ("t",)))))
        check_counts(log.state)
        mutate(log, rng, rng.randrange(0, 6))
    for sid, tree in rng.sample(captured, len(captured)):
        log.restore(sid)
        assert flat(ns.must_get(log.state.root, ("t",))) == tree
        log.restore(sid, to=f"/copy-{sid}")
        assert flat(ns.must_get(log.state.root, (f"copy-{sid}",))) == tree
        live = {}
        for h in ns.iter_chunks(log.state.root):
            live[h] = live.get(h, 0) + 1
        assert log.state.live == live
        assert (log.state.n_files, log.state.n_dirs) == ns.count(log.state.root)[:2]
    replayed = log.replay()
    assert dump(replayed) == dump(log.state)
    view = log.state.checkpoint_view()
    assert dump(decode_checkpoint(encode_checkpoint(view))) == dump(log.state)
    for sid, _tree in captured:
        log.do({"op": "snap_delete", "id": sid})
        check_counts(log.state)
    assert log.state.blocks == {} and log.state.snap == {}
    assert log.state.garbage_blocks  # every block of theirs is garbage now


def test_restore_in_place_after_a_small_change_reads_only_its_path():
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    for d in ("x", "y", "z"):
        log.do({"op": "mkdir", "path": f"/t/{d}", "parents": False, "mode": 0o755, "mtime": 1})
        for i in range(30):
            log.put(f"/t/{d}/f{i}", 10)
    sid = log.snapshot("/t")
    before = ns.must_get(log.state.root, ("t",))
    v = log.state.version_or_zero

    log.put("/t/y/f3", 20)
    live_y = ns.must_get(log.state.root, ("t", "y"))
    used = log.restore(sid)
    # /t and /t/y's head and the sub-blocks on f3's path: x and z are the live nodes, reused, and
    # y's other sub-blocks are re-encoded from the live y
    y_only = dir_block_set(before.children["y"], v) - dir_block_set(live_y, v)
    assert set(used) == {before.digest} | y_only
    assert len(y_only) <= 1 + 3 and len(dir_block_set(live_y, v)) > len(y_only)  # a split directory
    after = ns.must_get(log.state.root, ("t",))
    assert flat(after) == flat(before)
    assert after.children["x"] is before.children["x"]
    assert log.restore(sid) == []  # nothing differs any more
    log.put("/t/z/f1", 30)
    reused = []
    st = log.state
    merkle.assemble(bytes.fromhex(st.snapshots[sid]["root"]), dict(log.holder),
                    st.restore_candidates(("t",), "inplace", "/t"), st.version_or_zero, reused)
    # where the server checks they still are: x and y reused, z the source of its unchanged sub-blocks
    assert sorted(rel for rel, _n in reused) == [("x",), ("y",), ("z",)]
    assert all(ns.get(ns.must_get(st.root, ("t",)), rel) is n for rel, n in reused)


def test_a_second_snapshot_counts_only_new_blocks():
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    for d in range(20):
        log.do({"op": "mkdir", "path": f"/t/d{d}", "parents": False, "mode": 0o755, "mtime": 1})
        log.put(f"/t/d{d}/f", 10)
    log.snapshot("/t")
    v = log.state.version_or_zero
    t1 = dir_block_set(ns.must_get(log.state.root, ("t",)), v)
    assert len(t1) > 1  # 20 entries: /t is split into sub-blocks
    assert len(log.state.blocks) == 20 + len(t1)
    log.put("/t/d7/f", 11)
    log.snapshot("/t")
    t2 = dir_block_set(ns.must_get(log.state.root, ("t",)), v)
    op = log.ops[-1]
    # the new /t/d7 and /t's head and sub-blocks on d7's path, not its other sub-blocks
    assert len(decode_block_infos(op["blocks"])) == 1 + len(t2 - t1) < 1 + len(t2)
    assert len(log.state.blocks) == 21 + len(t1) + len(t2 - t1)
    log.do({"op": "snap_delete", "id": "s1"})
    assert len(log.state.blocks) == 20 + len(t2) and len(log.state.garbage_blocks) == 1 + len(t1 - t2)
    check_counts(log.state)


# --------------------------------------------------------------------------- the chunkserver's store


def _blocks(n, rng):
    """(digest, compressed bytes) as a put receives them."""
    out = []
    for _ in range(n):
        data = rng.randbytes(rng.randrange(1, 300))
        out.append((merkle.block_digest(data), merkle.compress(data)))
    return out


def test_block_store_verifies_on_receipt_and_read_and_survives_restart(tmp_path):
    rng = random.Random(1)
    s = BlockStore(tmp_path)
    items = _blocks(20, rng)
    assert s.put(items[:10]) == 10 and s.put(items[5:]) == 10  # the overlap is stored once
    assert s.missing([d for d, _ in items]) == []
    bad = [(items[0][0], merkle.compress(b"not it"))]
    with pytest.raises(CorruptData):
        s.put(bad)
    assert s.get([d for d, _ in items]) == items
    s2 = BlockStore(tmp_path)
    assert sorted(s2.digests()) == sorted(d for d, _ in items)
    # damage one block on disk: it fails its digest, is dropped and reported
    name, off, _ln = s2.index[items[3][0]]
    p = tmp_path / "blocks" / name
    raw = bytearray(p.read_bytes())
    raw[off + 8] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptData):
        s2.get([items[3][0]])
    assert items[3][0] in s2.dropped and s2.missing([items[3][0]]) == [items[3][0]]
    with pytest.raises(KeyError):
        s2.get([items[3][0]])


def test_block_store_unlinks_a_segment_once_nothing_in_it_is_wanted(tmp_path, monkeypatch):
    monkeypatch.setattr(blocklog, "SEGMENT_BYTES", 1)  # a segment per put
    rng = random.Random(2)
    s = BlockStore(tmp_path)
    a, b = _blocks(5, rng), _blocks(5, rng)
    s.put(a)
    s.put(b)
    assert len(list((tmp_path / "blocks").glob("*.log"))) == 2
    assert s.delete([d for d, _ in a]) == 5
    assert len(list((tmp_path / "blocks").glob("*.log"))) == 1
    s.delete([b[0][0]])
    assert s.missing([b[0][0]]) == [b[0][0]]
    # its segment still holds wanted blocks, so after a restart it is back (and reported in the
    # full heartbeat, where the master orders it deleted again)
    assert BlockStore(tmp_path).missing([b[0][0]]) == []
    assert BlockStore(tmp_path).get([d for d, _ in b[1:]]) == b[1:]


def test_a_version_bump_refreshes_the_digests_on_its_path():
    """A bump whose append never commits must not leave a digest that records the old version
    (a replay would compute another one and a restore op would not find its blocks)."""
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t/d", "parents": True, "mode": 0o755, "mtime": 1})
    log.put("/t/d/f", 10)
    log.put("/t/g", 10)
    st = log.state
    h = ns.must_get(st.root, ("t", "d", "f")).chunks[0]
    before = merkle.digest(st.root, st.version_or_zero)
    side = ns.must_get(st.root, ("t", "g"))
    log.do({"op": "bump", "h": h, "v": 2, "path": "/t/d/f"})
    after = merkle.digest(st.root, st.version_or_zero)
    assert after != before
    assert after == merkle.digest(log.replay().root, log.replay().version_or_zero)
    assert ns.must_get(st.root, ("t", "g")) is side and ns.must_get(st.root, ("t", "d", "f")).chunks == (h,)
    log.do({"op": "bump", "h": h, "v": 3, "path": "/t/moved-away"})  # the file is not there: nothing else
    assert st.version[h] == 3


def _assemble_from(serve, root, cands, v):
    have, memo, rounds = {}, {}, 0
    while True:
        rounds += 1
        try:
            tree, used = merkle.assemble(root, have, cands, v, [], memo)
            return tree, used, rounds
        except merkle.NeedBlocks as need:
            got = serve(need.digests)
            assert set(need.digests) <= set(got)
            have.update(got)


def test_restore_from_a_tree_in_memory_uses_the_same_blocks_as_from_a_holder():
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    for d in ("x", "y"):
        log.do({"op": "mkdir", "path": f"/t/{d}", "parents": False, "mode": 0o755, "mtime": 1})
        for i in range(120):
            log.put(f"/t/{d}/f{i}", 10)
    sid = log.snapshot("/t")
    st = log.state
    snap_tree = ns.must_get(st.root, ("t",))  # the committed snapshot's tree: /t as it is now
    log.put("/t/y/f3", 20)
    log.put("/t/y/f90", 20)
    cands = st.restore_candidates(("t",), "inplace", "/t")
    root = bytes.fromhex(st.snapshots[sid]["root"])
    local = merkle.TreeBlocks(snap_tree, st.version_or_zero)
    a, used_a, rounds_a = _assemble_from(local.take, root, cands, st.version_or_zero)
    b, used_b, rounds_b = _assemble_from(lambda ds: {d: log.holder[d] for d in ds}, root, cands, st.version_or_zero)
    assert flat(a) == flat(b) == flat(snap_tree)
    assert sorted(used_a) == sorted(used_b)  # the op carries the same blocks either way
    assert rounds_a < rounds_b  # a directory's sub-blocks come with its head


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_restore_in_place_as_edits_gives_the_tree_at_capture_and_replays_identically(rng):
    """Format 4, as the server makes it when the snapshot's tree is in memory: the edits that
    turn the live tree into it (the apply swaps in that tree; the log, replayed, makes the edits)."""
    from kubegfs.formats import packb, unpackb

    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    mutate(log, rng, 8)
    trees = {}
    for _ in range(3):
        sid = log.snapshot("/t")
        trees[sid] = log.state.pins.get(sid, None) or ns.must_dir(log.state.root, ("t",))
        mutate(log, rng, rng.randrange(0, 6))
    made = 0
    for sid, snap in rng.sample(sorted(trees.items()), len(trees)):
        if rng.random() < 0.5:
            mutate(log, rng, rng.randrange(1, 5))
        want = flat(snap)
        live = ns.must_dir(log.state.root, ("t",))
        edits = ns.edits_to(live, snap)
        if edits is None:  # a directory of the snapshot is gone from the live tree: from blocks
            log.restore(sid)
        else:
            made += 1
            edits = unpackb(packb(edits))  # as the log holds them
            assert flat(ns.apply_edits(live, edits)) == want
            e = log.state.snapshots[sid]
            log.do({"op": "restore", "format": 4, "id": sid, "path": "/t", "mode": "inplace", "mtime": 9,
                    "edits": edits, "counts": {"files": e["files"], "dirs": e["dirs"], "chunks": e["chunks"]},
                    "_tree": snap})
        assert flat(ns.must_get(log.state.root, ("t",))) == want
        live_refs = {}
        for h in ns.iter_chunks(log.state.root):
            live_refs[h] = live_refs.get(h, 0) + 1
        assert log.state.live == live_refs
        assert (log.state.n_files, log.state.n_dirs, log.state.n_bytes) == (*ns.count(log.state.root)[:2],
                                                                            ns.count(log.state.root)[3])
    replayed = log.replay()
    assert dump(replayed) == dump(log.state)
    assert flat(replayed.root) == flat(log.state.root)


def test_the_catalogs_blocks_generation_moves_with_every_block_counted_or_released():
    log = BlockLog()
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    log.put("/t/a", 5)
    g0 = log.state.blocks_gen
    a = log.snapshot("/t")
    g1 = log.state.blocks_gen
    assert g1 > g0
    b = log.snapshot("/t")  # the same blocks: counted again, none new
    assert log.state.blocks_gen == g1
    log.do({"op": "snap_delete", "id": a})  # still reached by b
    assert log.state.blocks_gen == g1
    log.do({"op": "snap_delete", "id": b})
    assert log.state.blocks_gen > g1


# --------------------------------------------------------------------------- precounted commits


def _tree(log, dirs=6, files=5):
    log.do({"op": "mkdir", "path": "/t", "parents": False, "mode": 0o755, "mtime": 1})
    for d in range(dirs):
        log.do({"op": "mkdir", "path": f"/t/d{d}", "parents": False, "mode": 0o755, "mtime": 1})
        for f in range(files):
            log.put(f"/t/d{d}/f{f}", 10, 1 + f % 2)


def _same_state(a, b):
    assert a.snap == b.snap and a.live == b.live and a.version == b.version
    assert {d: (c.refs, c.info) for d, c in a.blocks.items()} == {d: (c.refs, c.info) for d, c in b.blocks.items()}
    assert a.blocks_gen == b.blocks_gen and a.garbage == b.garbage


def test_a_precounted_commit_counts_what_the_commit_would_and_replays_identically():
    plain, pre = BlockLog(), BlockLog()
    for log in (plain, pre):
        _tree(log)
        log.snapshot("/t")
        log.put("/t/d3/f1", 12)  # a second snapshot with new blocks and old ones
        log.do({"op": "rm", "path": "/t/d5/f0", "mtime": 2})
    plain.snapshot("/t")
    sid = pre.capture("/t")
    gen, infos, before = pre.state.blocks_gen, pre.new_infos(sid), dict(pre.state.snap)
    assert asyncio.run(precount.precount(pre.state, gen, infos, per=1))  # one block per slice
    assert pre.state.snap == plain.state.snap != before  # counted before the commit
    pre.commit(sid, infos, precounted=True)
    _same_state(pre.state, plain.state)
    check_counts(pre.state)
    _same_state(pre.replay(), pre.state)  # the log never says it was precounted
    assert all("_precounted" not in op for op in pre.ops)


def test_a_precount_goes_back_when_a_block_is_counted_meanwhile():
    """Two snapshots of the same tree pending at once: the second one's precount is under way
    when the first one commits (counting the blocks both reach), so it takes its references
    back and the second commit counts as usual."""
    log = BlockLog()
    _tree(log)
    first = log.capture("/t")
    second = log.capture("/t")
    before = dict(log.state.snap)
    gen, infos = log.state.blocks_gen, log.new_infos(second)

    async def race():
        task = asyncio.ensure_future(precount.precount(log.state, gen, infos, per=1))
        await asyncio.sleep(0)  # its first slice is counted
        assert log.state.snap != before
        log.commit(first)  # counts the same blocks: blocks_gen moves
        return await task

    assert asyncio.run(race()) is False
    check_counts(log.state)  # exactly the first snapshot's references: the precount is gone
    assert log.new_infos(second) == {}  # nothing new left for the second one
    log.commit(second)
    check_counts(log.state)
    _same_state(log.replay(), log.state)


def test_a_commit_logged_with_its_rows_compressed_or_not_replays_the_same():
    """A commit op's ``blocks`` are compressed rows; a log written with plain rows (before)
    replays to the same state."""
    logs = {}
    for compressed in (True, False):
        log = BlockLog()
        _tree(log, dirs=40)
        sid = log.capture("/t")
        infos = log.new_infos(sid)
        log.commit(sid, infos, compressed=compressed)
        blocks = log.ops[-1]["blocks"]
        assert isinstance(blocks, bytes) == compressed
        assert decode_block_infos(blocks) == infos
        _same_state(log.replay(), log.state)
        logs[compressed] = (log, len(packb(blocks)))
    _same_state(logs[True][0].state, logs[False][0].state)
    assert logs[True][1] < logs[False][1]
    with pytest.raises(CorruptData):
        decode_block_infos(b"not zstd")


def test_a_precount_done_before_another_commit_is_released_and_the_commit_counts_as_usual():
    """The server precounts while the blocks ship: when another snapshot commits first,
    precount.release takes the references back and the commit counts as usual."""
    log = BlockLog()
    _tree(log)
    first, second = log.capture("/t"), log.capture("/t")
    before = dict(log.state.snap)
    gen, infos = log.state.blocks_gen, log.new_infos(second)
    assert asyncio.run(precount.precount(log.state, gen, infos, per=1))
    assert log.state.snap != before
    log.commit(first)
    assert log.state.blocks_gen != gen  # the second commit may not take them
    asyncio.run(precount.release(log.state, infos, per=1))
    check_counts(log.state)
    log.commit(second)
    check_counts(log.state)
    _same_state(log.replay(), log.state)


def test_an_early_precount_the_commit_never_took_is_taken_back_as_the_build_ends(monkeypatch):
    monkeypatch.setattr(precount, "PRECOUNT_MIN", 1)
    monkeypatch.setattr(precount, "PRECOUNT_SLICE", 1)
    log = BlockLog()
    _tree(log)
    sid = log.capture("/t")
    before = dict(log.state.snap)
    gen, infos = log.state.blocks_gen, log.new_infos(sid)

    async def build_that_fails(running: bool):
        s = Snapshots(SimpleNamespace(state=log.state))  # type: ignore[arg-type]
        enc = Encoded(infos=(gen, infos, encode_block_infos(infos)))
        s._precount_early(enc)
        assert enc.early is not None
        if running:  # stopped after its first slice
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert not enc.early.done()
        else:
            assert await enc.early
        assert log.state.snap != before
        s._drop_early(enc)  # the build ended without its commit
        for _ in range(50):
            await asyncio.sleep(0)
        assert not s._unclaiming

    for running in (False, True):
        asyncio.run(build_that_fails(running))
        assert log.state.snap == before

    async def infos_after_the_end():  # the infos job ends after a build that failed
        s = Snapshots(SimpleNamespace(state=log.state))  # type: ignore[arg-type]
        enc = Encoded()
        s._drop_early(enc)
        enc.infos = (gen, infos, encode_block_infos_z(infos))
        s._precount_early(enc)
        assert enc.early is None

    asyncio.run(infos_after_the_end())
    assert log.state.snap == before


def test_a_precount_of_a_stale_generation_counts_nothing():
    log = BlockLog()
    _tree(log, dirs=2)
    sid = log.capture("/t")
    before = dict(log.state.snap)
    assert asyncio.run(precount.precount(log.state, log.state.blocks_gen - 1, log.new_infos(sid))) is False
    assert log.state.snap == before


def test_a_cancelled_precount_leaves_nothing_counted():
    log = BlockLog()
    _tree(log)
    sid = log.capture("/t")
    before = dict(log.state.snap)

    async def cancel():
        task = asyncio.ensure_future(precount.precount(log.state, log.state.blocks_gen, log.new_infos(sid), per=1))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    assert log.state.snap == before


def test_precount_slices_keep_blocks_whole():
    infos = [merkle.BlockInfo((), bytes(8 * n)) for n in (3, 0, 5, 1, 7, 2)]
    parts = list(precount.slices(infos, 6))
    assert [x for p in parts for x in p] == infos
    assert [sum(len(i.handles) // 8 for i in p) for p in parts] == [8, 8, 2]


def test_a_precount_cancelled_while_it_goes_back_leaves_nothing_counted():
    log = BlockLog()
    _tree(log)
    first, second = log.capture("/t"), log.capture("/t")
    gen, infos = log.state.blocks_gen, log.new_infos(second)

    async def race():
        task = asyncio.ensure_future(precount.precount(log.state, gen, infos, per=1))
        for _ in range(3):
            await asyncio.sleep(0)
        log.commit(first)  # blocks_gen moves: the precount starts going back, a slice a turn
        await asyncio.sleep(0)  # one slice taken back, two to go
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(race())
    check_counts(log.state)


def test_a_small_commit_is_counted_early_too():
    """However few its new blocks (a snapshot after a small change), their chunk references
    are counted while the blocks are on their way, not in the commit's apply."""
    plain, pre = BlockLog(), BlockLog()
    for log in (plain, pre):
        _tree(log)
        log.snapshot("/t")
        log.put("/t/d3/f1", 12)
    plain.snapshot("/t")
    sid = pre.capture("/t")
    gen, infos, before = pre.state.blocks_gen, pre.new_infos(sid), dict(pre.state.snap)
    assert 0 < len(infos) < precount.PRECOUNT_MIN

    async def early() -> bool:
        s = Snapshots(SimpleNamespace(state=pre.state))  # type: ignore[arg-type]
        enc = Encoded(infos=(gen, infos, encode_block_infos_z(infos)))
        s._precount_early(enc)
        assert enc.early is not None
        return await enc.early

    assert asyncio.run(early())
    assert pre.state.snap == plain.state.snap != before
    pre.commit(sid, infos, precounted=True)
    _same_state(pre.state, plain.state)
    _same_state(pre.replay(), pre.state)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=60), st.lists(st.lists(st.integers(1, 60), max_size=8), max_size=20))
def test_snapshot_references_count_each_handle_as_often_as_it_comes(before, blocks):
    """Handles none of which is counted yet, each once (a first snapshot's: counted in one step),
    or some counted already or repeated (one at a time): the same counts either way."""
    state = BlockLog().state
    state.count_snapshot_refs(before)
    want = dict(state.snap)
    for h in [h for b in blocks for h in b]:
        want[h] = want.get(h, 0) + 1
    infos = [merkle.BlockInfo((), array("q", b).tobytes()) for b in blocks]
    state.precount_blocks(infos)
    assert state.snap == want
    state.unprecount_blocks(infos)
    assert state.snap == dict(Counter(before))
