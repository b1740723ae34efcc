"""Records written by earlier kubegfs versions still parse and restore.

``tests/data/snapobj-v2.rec`` was written by the format-2 (single-file, packed tree columns)
builder before content-addressed directory blocks existed; ``snapobj-v2.json`` says what it holds.
"""

import json
from pathlib import Path

import immutables
from test_merkle import assemble_fetching

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.formats import packb, sha256_hex, unpackb
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


def _format1(d, out):
    """Blocks of tree ``d`` as block format 1 wrote them (one per directory, whatever its size:
    ``[1, mode, mtime, names, ...]``, format 2's fields without kind and parts); its digest."""
    items = sorted(d.children.items())
    kids = {n: _format1(k, out) for n, k in items if isinstance(k, ns.Dir)}
    by_id = {id(k): n for n, k in items}
    data = merkle._entries_block(merkle.KIND_DIR, d.mode, d.mtime, items, lambda _h: 1,
                                 lambda c: kids[by_id[id(c)]])[0]
    raw = unpackb(data)
    f1 = packb([1, *raw[2:13]])
    dg = merkle.block_digest(f1)
    out[dg] = f1
    return dg


def test_a_big_directory_restored_from_format1_blocks_is_digested_afresh_and_restored_over():
    """A directory restored from a format-1 block is not memoised with that block's digest
    (this version encodes it as split sub-blocks with another head), so a restore in place over
    it compares what it holds, and a snapshot of it names this format's blocks."""
    def v(_h):
        return 1

    big = ns.Dir(immutables.Map({f"file-{i:03d}-{i * 7919 % 1000:03d}": ns.File(i, 1, 0o644, (i,))
                                 for i in range(60)}), 1, 0o755)
    blocks: dict = {}
    root1 = _format1(ns.Dir(immutables.Map({"big": big}), 1, 0o755), blocks)
    tree, _used = merkle.assemble(root1, blocks, [None], v)
    assert {merkle.format_of(b) for b in blocks.values()} == {1}
    tb = tree.children["big"]
    assert tb.digest is None and tb.stats == (60, 1, 60, sum(range(60)))
    fresh = merkle.digest(ns.Dir(tb.children, tb.mtime, tb.mode), v)
    assert merkle.digest(tb, v) == fresh and merkle.blocks_of_dir(tb, v).kids  # split, in this format
    # a snapshot without one entry past the first leaf and with another changed, restored over it
    names = sorted(big.children)
    snap = ns.replace(tree, ("big", names[50]), None, 3)
    snap = ns.replace(snap, ("big", names[2]), ns.File(9, 9, 0o644, (999,)), 3)
    want = {n: (k.size, k.chunks) for n, k in snap.children["big"].children.items()}
    snap = ns.Dir(immutables.Map({"big": ns.Dir(immutables.Map(dict(snap.children["big"].children)), 3, 0o755)}),
                  1, 0o755)  # (its nodes new: nothing shared with the restored tree)
    held = {dg: b for dg, b, _n in merkle.iter_blocks(snap, v, lambda _d: False)}
    out = assemble_fetching(merkle.digest(snap, v), held, [tree], v)
    assert {n: (k.size, k.chunks) for n, k in out.children["big"].children.items()} == want
    assert merkle.digest(out, v) == merkle.digest(snap, v)
