"""Records written by earlier kubegfs versions still parse and restore.

``tests/data/snapobj-v2.rec`` was written by the format-2 (single-file, packed tree columns)
builder before content-addressed directory blocks existed; ``snapobj-v2.json`` says what it holds.
"""

import json
from pathlib import Path

import immutables
import pytest

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.formats import sha256_hex
from kubegfs.master.state import MasterState
from kubegfs.snapdiff import diff_steps, run
from kubegfs.snapobj import parse_manifest, parse_record

DATA = Path(__file__).parent.parent / "data"


def _expected():
    return json.loads((DATA / "snapobj-v2.json").read_text())


def _flat(root):
    return [["/" + "/".join(p), "f" if isinstance(n, ns.File) else "d", n.mode, n.mtime,
             getattr(n, "size", None), list(getattr(n, "chunks", ()))] for p, n in ns.walk(root)]


def test_v2_record_parses_to_the_tree_it_was_written_from():
    exp = _expected()
    data = (DATA / "snapobj-v2.rec").read_bytes()
    assert sha256_hex(data) == exp["sha256"]
    rec = parse_record(data, exp["sha256"])
    assert rec.header["name"] == "compat-v2" and rec.header["format"] == 2
    assert (rec.files, rec.dirs) == (exp["counts"]["files"], exp["counts"]["dirs"])
    assert _flat(rec.root) == exp["tree"]
    versions = {int(k, 16): v for k, v in exp["versions"].items()}
    assert rec.chunks == [(h, versions[h]) for row in exp["tree"] for h in row[5]]


def test_v2_record_restores_through_the_state_machine():
    exp = _expected()
    data = (DATA / "snapobj-v2.rec").read_bytes()
    st = MasterState()
    for h in (0x100000001, 0x100000002, 0x100000003):
        st.version[h] = 1
    out = st.apply({"op": "restore", "id": exp["meta"]["id"], "path": "/restored", "mode": "new",
                    "blob": data, "mtime": 5})
    assert out == {"files": 3, "dirs": 3, "chunks": 3}
    restored = ns.must_get(st.root, ("restored",))
    assert _flat(restored) == exp["tree"]
    assert st.live == {0x100000001: 1, 0x100000002: 1, 0x100000003: 1}
    assert (st.n_files, st.n_bytes) == (3, 70_000_010)


# ``tests/data/snapobj-v3-blocks1.*``: a format-3 record (a root digest) written by the first
# block format (one block per directory, ``[1, mode, mtime, names, ...]``), before large
# directories were split into sub-blocks: ``.rec`` the record, ``.blocks`` the directory blocks it
# reaches as block frames (merkle.pack_frames), ``.json`` what they hold.


def _v3():
    return json.loads((DATA / "snapobj-v3-blocks1.json").read_text())


def _v3_blocks():
    return dict(merkle.unpack_frames((DATA / "snapobj-v3-blocks1.blocks").read_bytes()))  # verified


def test_format1_blocks_decode_and_name_their_children_and_chunks():
    exp = _v3()
    data = (DATA / "snapobj-v3-blocks1.rec").read_bytes()
    man = parse_manifest(data, exp["sha256"])
    assert man.root.hex() == exp["root"] and man.header["name"] == "compat-v3-blocks1"
    blocks = _v3_blocks()
    assert {d.hex() for d in blocks} == set(exp["blocks"])
    for d, b in blocks.items():
        merkle.decode_block(b, d)
        info = merkle.block_info(b)
        assert [c.hex() for c in info.children] == exp["blocks"][d.hex()]["children"]
        assert merkle.block_chunks(b) == exp["blocks"][d.hex()]["chunks"]


def _v3_state():
    exp = _v3()
    st = MasterState()
    for h, v in exp["versions"].items():
        st.version[int(h, 16)] = v
    return st, exp


def test_format1_blocks_restore_through_the_state_machine_and_are_counted():
    st, exp = _v3_state()
    blocks = _v3_blocks()
    root = bytes.fromhex(exp["root"])
    # counted as a committed snapshot's blocks are (master recover adopts them this way)
    st.ref_blocks(root, {d: merkle.block_info(b) for d, b in blocks.items()})
    assert set(st.blocks) == set(blocks)
    assert sorted(st.snap) == sorted(int(h, 16) for h in exp["versions"])
    tree, used = merkle.assemble(root, blocks, [None], st.version_or_zero)
    assert set(used) == set(blocks)
    out = st.apply({"op": "restore", "id": exp["meta"]["id"], "path": "/restored", "mode": "new",
                    "mtime": 5, "format": 3, "root": exp["root"], "source_path": "/data",
                    "blocks": merkle.pack_frames(list(blocks.items())),
                    "counts": {k: exp["counts"][k] for k in ("files", "dirs", "chunks")}})
    assert out == {"files": 4, "dirs": 5, "chunks": 4}
    assert _flat(ns.must_get(st.root, ("restored",))) == exp["tree"]
    assert _flat(tree) == exp["tree"]
    st.unref_block(root)
    assert not st.blocks and set(st.garbage_blocks) == set(blocks)


def test_format1_blocks_diff_against_a_live_tree():
    exp = _v3()
    blocks = _v3_blocks()
    root = bytes.fromhex(exp["root"])
    st, _ = _v3_state()
    tree, _used = merkle.assemble(root, blocks, [None], st.version_or_zero)
    changed = ns.replace(tree, ("logs", "c.log"), ns.File(1, 2, 0o644, ()), 3)
    live = merkle.DirRef(merkle.digest(changed, st.version_or_zero), changed)

    def load(refs):
        return [merkle.block_of(r.node, st.version_or_zero) if r.node is not None
                else merkle.decode_block(blocks[r.digest], r.digest) for _side, r in refs]

    got = run(diff_steps(merkle.DirRef(root), live), load)
    assert [c.line() for c in got] == ["M\t./logs", "+\t./logs/c.log"]


# ``tests/data/blocks-v2.*``: the directory blocks of a tree written by block format 2 (main at
# 0b901fe: leaves of ~16 entries, LEAF_BITS 4, an index level above 2 leaves), before format 3's
# bigger leaves and flat heads: ``.blocks`` the blocks as frames (merkle.pack_frames), ``.json``
# the tree they hold (a 300-entry directory split in leaves and index sub-blocks, a 40-entry one
# split in leaves, small ones in one block). Written by tests/data/make_blocks_v2.py.


def _v2():
    exp = json.loads((DATA / "blocks-v2.json").read_text())
    return exp, dict(merkle.unpack_frames((DATA / "blocks-v2.blocks").read_bytes())), \
        lambda h: exp["versions"].get(f"{h:x}", 0)


def _tree_of(rows):
    """The tree a listing (``_flat``'s rows) describes, every directory a new node."""
    kids: dict = {}
    for path, kind, mode, mtime, size, chunks in rows:
        parts = tuple(path.strip("/").split("/")) if path != "/" else ()
        kids[parts] = ns.File(size, mtime, mode, tuple(chunks)) if kind == "f" else (mode, mtime)

    def build(prefix):
        below = {p[-1]: (build(p) if isinstance(v, tuple) else v) for p, v in kids.items()
                 if len(p) == len(prefix) + 1 and p[:-1] == prefix}
        mode, mtime = kids[prefix]
        return ns.Dir(immutables.Map(below), mtime, mode)
    return build(())


@pytest.fixture
def format2(monkeypatch):
    """The split format 2 made (patched in for the test: blocks as main at 0b901fe wrote them)."""
    def use():
        monkeypatch.setattr(merkle, "BLOCK_FORMAT", 2)
        monkeypatch.setattr(merkle, "LEAF_BITS", 4)
        monkeypatch.setattr(merkle, "HEAD_MAX", 0)
        monkeypatch.setattr(merkle, "MIN_SPLIT", 16)
        monkeypatch.setattr(merkle, "_BOUNDARY", bytes(0 if i & 15 == 0 else 1 for i in range(256)))
    return use


def _restore(root, blocks, live, vo):
    have: dict = {}
    memo = merkle.Decoded()
    while True:
        try:
            return merkle.assemble(root, have, live, vo, [], memo)
        except merkle.NeedBlocks as need:
            have.update({d: blocks[d] for d in need.digests})


def test_format2_blocks_decode_and_restore_to_the_tree_they_were_written_from(format2):
    exp, blocks, vo = _v2()
    root = bytes.fromhex(exp["root"])
    assert {merkle.format_of(b) for b in blocks.values()} == {2}
    kinds = [merkle.decode_block(b, d).kind for d, b in blocks.items()]
    assert (kinds.count(merkle.KIND_DIR), kinds.count(merkle.KIND_PART)) == (exp["heads"], exp["sub_blocks"])
    big = merkle.decode_block(blocks[bytes.fromhex(exp["big_head"])])
    assert any(merkle.decode_block(blocks[p]).parts for p in big.parts)  # an index level below the head
    tree, used = merkle.assemble(root, blocks, [None], vo)
    assert set(used) == set(blocks) and _flat(tree) == exp["tree"]
    # restored from another format's blocks: counted, but digested afresh in this one (format 3)
    assert tree.digest is None and tree.stats == merkle.stats(_tree_of(exp["tree"]), vo)
    fresh = merkle.digest(_tree_of(exp["tree"]), vo)
    assert merkle.digest(tree, vo) == fresh != root
    assert {merkle.format_of(b) for _d, b, _n in merkle.iter_blocks(tree, vo, lambda _d: False)} == {3}
    # format 2's split patched back in gives the very blocks main wrote (the tests below use it)
    format2()
    assert merkle.digest(_tree_of(exp["tree"]), vo) == root


def _changed(tree, vo):
    """``tree`` with a file in the big directory and one in the mid-size one changed, one added and one
    removed (digested in this format)."""
    big, mid = sorted(tree.children["big"].children), sorted(tree.children["mid"].children)
    t = ns.replace(tree, ("big", big[7]), ns.File(1, 2, 0o600, ()), 3)
    t = ns.replace(t, ("big", "part-new"), ns.File(5, 6, 0o644, ()), 3)
    t = ns.replace(t, ("mid", mid[30]), None, 3)
    t = ns.replace(t, ("mid", mid[3]), ns.File(9, 9, 0o644, ()), 3)
    merkle.digest(t, vo)
    return t, [f"M\t./big/{big[7]}", "+\t./big/part-new", "M\t./mid", f"M\t./mid/{mid[3]}", f"-\t./mid/{mid[30]}",
               "M\t./big"]


def test_format2_blocks_restore_in_place_over_a_format3_tree_and_again_over_the_result():
    exp, blocks, vo = _v2()
    root = bytes.fromhex(exp["root"])
    live, _lines = _changed(_tree_of(exp["tree"]), vo)
    assert merkle.format_of(merkle.blocks_of_dir(live.children["big"], vo).head) == 3
    assert merkle.blocks_of_dir(live.children["big"], vo).kids  # split in format 3 too
    tree, _used = _restore(root, blocks, [live], vo)  # the live leaves share no digest with format 2's
    assert _flat(tree) == exp["tree"]
    assert merkle.digest(tree, vo) == merkle.digest(_tree_of(exp["tree"]), vo)
    # the restored tree is live now: change it, snapshot it (format 3), restore each snapshot over it
    live2, _lines = _changed(tree, vo)
    snap3 = {d: b for d, b, _n in merkle.iter_blocks(tree, vo, lambda _d: False)}
    for target, want in ((root, exp["tree"]), (merkle.digest(tree, vo), exp["tree"])):
        again, _used = _restore(target, {**blocks, **snap3}, [live2], vo)
        assert _flat(again) == want
        assert merkle.digest(again, vo) == merkle.digest(_tree_of(want), vo)
    # and the memoised digests of what a format-3 restore edited name its blocks
    again, _used = _restore(merkle.digest(tree, vo), snap3, [live2], vo)
    got = {d: b for d, b, _n in merkle.iter_blocks(again, vo, lambda _d: False)}
    assert set(got) == set(snap3)


def test_format2_blocks_diff_against_a_format3_tree_both_ways():
    exp, blocks, vo = _v2()
    root = bytes.fromhex(exp["root"])
    live, lines = _changed(_tree_of(exp["tree"]), vo)
    new = {d: b for d, b, _n in merkle.iter_blocks(live, vo, lambda _d: False)}
    store = {**blocks, **new}

    def load(refs):
        return [merkle.decode_block(store[r.digest], r.digest) for _side, r in refs]

    want = sorted(lines)
    got = run(diff_steps(merkle.DirRef(root), merkle.DirRef(merkle.digest(live, vo))), load)
    assert sorted(c.line() for c in got) == want
    back = run(diff_steps(merkle.DirRef(merkle.digest(live, vo), live), merkle.DirRef(root)),
               lambda refs: [merkle.block_of(r.node, vo) if r.node is not None else load([(0, r)])[0] for _s, r in refs])
    flip = {"+": "-", "-": "+", "M": "M"}
    assert sorted(c.line() for c in back) == sorted(flip[x[0]] + x[1:] for x in want)


def test_format2_blocks_restore_through_the_state_machine_and_are_counted():
    exp, blocks, _vo = _v2()
    st = MasterState()
    for h, v in exp["versions"].items():
        st.version[int(h, 16)] = v
    root = bytes.fromhex(exp["root"])
    st.ref_blocks(root, {d: merkle.block_info(b) for d, b in blocks.items()})
    assert set(st.blocks) == set(blocks)
    files = sum(1 for r in exp["tree"] if r[1] == "f")
    out = st.apply({"op": "restore", "id": "r-v2", "path": "/restored", "mode": "new", "mtime": 5, "format": 3,
                    "root": exp["root"], "source_path": "/data", "blocks": merkle.pack_frames(list(blocks.items())),
                    "counts": {"files": files, "dirs": 1 + sum(1 for r in exp["tree"] if r[1] == "d"),
                               "chunks": sum(len(r[5]) for r in exp["tree"])}})
    assert out["files"] == files
    assert _flat(ns.must_get(st.root, ("restored",))) == exp["tree"]
    st.unref_block(root)
    assert not st.blocks and set(st.garbage_blocks) == set(blocks)
