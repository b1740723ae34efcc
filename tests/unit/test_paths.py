import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubegfs import paths
from kubegfs.errors import InvalidArgument


@pytest.mark.parametrize(
    "raw,norm",
    [("/", "/"), ("//a/./b/", "/a/b"), ("/a//b", "/a/b"), ("/./", "/"), ("/a/b/.", "/a/b"),
     ("/ünïcode/名前", "/ünïcode/名前")],
)
def test_normalize(raw, norm):
    assert paths.normalize(raw) == norm


@pytest.mark.parametrize(
    "bad,msg",
    [("a/b", "absolute"), ("", "absolute"), ("/a/../b", ".."), ("/..", ".."), ("/a\x00b", "NUL"),
     ("/a\nb", "control"), ("/a\x7fb", "control"), ("/" + "x" * 256, "255"),
     ("/" + "/".join(["abcdefgh"] * 600), "4096"), ("/" + "/".join(["a"] * 300), "deeper")],
)
def test_rejects(bad, msg):
    with pytest.raises(InvalidArgument) as ei:
        paths.split(bad)
    assert msg in ei.value.message


def test_non_string_rejected():
    with pytest.raises(InvalidArgument):
        paths.split(b"/a")  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_normaliser_never_crashes_and_is_idempotent(s):
    try:
        n = paths.normalize(s)
    except InvalidArgument:
        return
    assert n.startswith("/")
    assert paths.normalize(n) == n
    assert "/../" not in n + "/" and "\x00" not in n
    assert "//" not in n


def test_is_within():
    assert paths.is_within(("a", "b"), ("a",))
    assert paths.is_within(("a",), ("a",))
    assert not paths.is_within(("ab",), ("a",))
    assert paths.is_within(("x",), ())
