import typing

import pytest

from kubegfs.errors import CorruptData
from kubegfs.master import ops
from kubegfs.master.checkpoint import dump
from kubegfs.master.state import _APPLY, MasterState


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
