import typing

import pytest

from kubegfs import namespace as ns
from kubegfs import wire
from kubegfs.errors import CorruptData
from kubegfs.formats import pack_handles
from kubegfs.master import ops
from kubegfs.master.checkpoint import dump
from kubegfs.master.http import Api
from kubegfs.master.state import _APPLY, MasterState


def keys_of(td: type) -> tuple[set[str], set[str]]:
    """A TypedDict's required and declared keys. (3.11's TypedDict does not see NotRequired in
    postponed annotations, so they are read as written.)"""
    hints = {k: a.__forward_arg__ for k, a in td.__annotations__.items()}
    return {k for k, a in hints.items() if not a.startswith("NotRequired[")}, set(hints)


def test_every_op_kind_has_a_record_type_and_an_apply_method():
    assert set(ops.KINDS.values()) == set(typing.get_args(ops.Op))
    assert set(_APPLY) == set(ops.KINDS)
    for kind, cls in ops.KINDS.items():
        assert cls.__annotations__["op"].__forward_arg__ == f"Literal[{kind!r}]"
        assert _APPLY[kind].__name__ == f"_apply_{kind}"


def test_an_unknown_op_kind_is_corrupt_data_and_changes_nothing():
    st = MasterState()
    st.apply(st.prepare_mkdir("/a"))
    before = dump(st)
    bogus = typing.cast(ops.Op, {"op": "frobnicate", "path": "/a", "seq": 7})
    with pytest.raises(CorruptData, match="unknown op kind 'frobnicate'.*seq 7"):
        st.apply(bogus)
    assert dump(st) == before


def test_typed_constructors_keep_the_record_key_order():
    """The op log stores ops as msgpack maps: the constructors must write keys in the order the
    dict literals did, so a record's bytes stay the same."""
    st = MasterState()
    assert list(st.prepare_mkdir("/a")) == ["op", "path", "parents", "mode", "mtime"]
    st.apply(st.prepare_mkdir("/a"))
    assert list(st.prepare_mv("/a", "/b")) == ["op", "src", "dst", "mtime"]
    assert list(st.prepare_rm("/a")) == ["op", "path", "mtime"]


def test_catalog_entries_have_exactly_the_snapshot_entry_keys():
    """Captured, committed, failed and adopted entries carry every required key of
    SnapshotEntry and no key it does not declare."""
    st = MasterState()
    st.apply(st.prepare_mkdir("/d"))
    required, declared = keys_of(ops.SnapshotEntry)
    for sid in ("ok", "bad"):
        st.apply(ops.SnapCapture(op="snap_capture", id=sid, name=sid, path="/d", created=5, copies=1))
    st.apply(ops.SnapFail(op="snap_fail", id="bad", error="no chunkserver"))
    st.apply(ops.SnapCommit(op="snap_commit", id="ok", sha256="x", record_bytes=3, holders=[],
                            files=0, dirs=1, chunks=0, logical_bytes=0, duration_seconds=0.1,
                            handles_z=pack_handles([])))
    st.apply(ops.SnapAdopt(op="snap_adopt", id="old", name="old", path="/d", created=5, sha256="y",
                           record_bytes=3, holders=[{"id": "cs1"}], files=0, dirs=1,
                           logical_bytes=0, handles_z=pack_handles([]), versions=b""))
    assert [e["state"] for e in st.snapshots.values()] == ["ready", "failed", "ready"]
    for e in st.snapshots.values():
        assert required <= set(e) <= declared, e["id"]


def test_stat_bodies_have_exactly_the_wire_stat_keys():
    required, declared = keys_of(wire.Stat)
    f = Api._stat(None, "/d/f", ns.File(3, 1, 0o644, (7,)))
    d = Api._stat(None, "/d", ns.empty_root())
    for body in (f, d):
        assert required <= set(body) <= declared
    assert f["size"] == 3 and f["chunks"] == 1 and d["entries"] == 0
