"""Records written by earlier kubegfs versions still parse and restore.

``tests/data/snapobj-v2.rec`` was written by the format-2 (single-file, packed tree columns)
builder before content-addressed directory blocks existed; ``snapobj-v2.json`` says what it holds.
"""

import json
from pathlib import Path

from kubegfs import namespace as ns
from kubegfs.formats import sha256_hex
from kubegfs.master.state import MasterState
from kubegfs.snapobj import parse_record

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
