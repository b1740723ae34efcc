"""Client-verified reads (kubegfs/rangecrc.py): the blocks a range is served as, the check of
every block against its stored CRC, and the store's side of it (``ChunkStore.open_range``)."""

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs import rangecrc
from kubegfs.chunkserver.store import ChunkStore
from kubegfs.client import _checked
from kubegfs.errors import Conflict, CorruptData, InvalidArgument, NotFound
from kubegfs.formats import BLOCK_SIZE

B = BLOCK_SIZE


def _crcs(chunk: bytes, first: int, count: int) -> list[int]:
    return [zlib.crc32(chunk[(first + i) * B : (first + i + 1) * B]) for i in range(count)]


def _answer(chunk: bytes, offset: int, length: int) -> tuple[memoryview, dict[str, str]]:
    """What the data port sends for a range of ``chunk``: its covering blocks and their CRCs."""
    first, count = rangecrc.covering(offset, length, len(chunk))
    base, n = rangecrc.span(first, count, len(chunk))
    headers = {"x-kubegfs-base": str(base), "x-kubegfs-chunk-length": str(len(chunk)),
               "x-kubegfs-crcs": rangecrc.encode(_crcs(chunk, first, count))}
    return memoryview(chunk[base : base + n]), headers


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5 * B + 7), st.integers(0, 6 * B), st.integers(0, 6 * B))
def test_any_range_is_served_as_its_covering_blocks_and_checks(size, offset, length):
    chunk = bytes((i * 7 + i // B) & 0xFF for i in range(size))
    offset = min(offset, size)
    body, headers = _answer(chunk, offset, length)
    base = int(headers["x-kubegfs-base"])
    assert base <= offset and base % B == 0 and len(body) < min(size - offset, length) + 2 * B
    if length and offset < size:
        assert base + len(body) >= min(size, offset + length)  # covers the whole range
    got = _checked(body, headers, offset, length)
    assert bytes(got) == chunk[offset : offset + length]


def test_a_flipped_byte_anywhere_in_the_answer_is_caught():
    chunk = os.urandom(3 * B + 100)
    for offset, length in ((0, len(chunk)), (100, 70_000), (3 * B + 5, 10), (B - 1, 2)):
        body, headers = _answer(chunk, offset, length)
        for pos in (0, len(body) // 2, len(body) - 1):
            bad = bytearray(body)
            bad[pos] ^= 0x01
            with pytest.raises(CorruptData):
                _checked(memoryview(bad), headers, offset, length)


@pytest.mark.parametrize("change", [
    lambda body, h: (body[:-1], h),  # a short answer
    lambda body, h: (body[B:], {**h, "x-kubegfs-base": str(B)}),  # a later base than asked
    lambda body, h: (body, {**h, "x-kubegfs-base": "1"}),  # not a block boundary
    lambda body, h: (body, {**h, "x-kubegfs-crcs": h["x-kubegfs-crcs"][:-8]}),  # a CRC missing
    lambda body, h: (body, {**h, "x-kubegfs-crcs": h["x-kubegfs-crcs"] + "00000000"}),  # one too many
    lambda body, h: (body, {**h, "x-kubegfs-crcs": "zz" + h["x-kubegfs-crcs"][2:]}),  # not hex
    lambda body, h: (body, {**h, "x-kubegfs-chunk-length": str(len(body) + 5)}),  # a short last block mid-chunk
    lambda body, h: (body, {k: v for k, v in h.items() if k != "x-kubegfs-crcs"}),
    lambda body, h: (body, {k: v for k, v in h.items() if k != "x-kubegfs-base"}),
])
def test_an_answer_that_does_not_fit_its_crcs_is_corrupt(change):
    chunk = os.urandom(2 * B + 10)
    body, headers = _answer(chunk, 0, len(chunk))
    _checked(body, headers, 0, len(chunk))  # as sent, it checks
    bad_body, bad_headers = change(body, headers)
    with pytest.raises(CorruptData):
        _checked(memoryview(bad_body), bad_headers, 0, len(chunk))


def test_covering_and_span_at_the_edges():
    assert rangecrc.covering(0, 0, 100) == (0, 0)
    assert rangecrc.covering(100, 10, 100) == (0, 0)  # at the end: nothing
    assert rangecrc.covering(B, 1, 3 * B) == (1, 1)
    assert rangecrc.covering(B - 1, 2, 3 * B) == (0, 2)
    assert rangecrc.covering(0, 10 * B, 2 * B + 1) == (0, 3)
    assert rangecrc.span(2, 1, 2 * B + 1) == (2 * B, 1)  # the chunk's short last block
    assert rangecrc.span(0, 0, 5) == (0, 0)


def test_open_range_names_the_covering_blocks_and_their_stored_crcs(tmp_path):
    store = ChunkStore(tmp_path, 8 * B)
    data = os.urandom(3 * B + 123)
    store.write(9, 0, data, 2)
    rr = store.open_range(9, B + 5, B, min_version=2)
    try:
        assert (rr.base, rr.length, rr.size, rr.version) == (B, 2 * B, len(data), 2)
        assert rr.crcs == _crcs(data, 1, 2)
        assert os.pread(rr.fd, rr.length, rr.base) == data[B : 3 * B]
    finally:
        os.close(rr.fd)
    rr = store.open_range(9, 3 * B, 1 << 20)
    os.close(rr.fd)
    assert (rr.base, rr.length, rr.crcs) == (3 * B, 123, _crcs(data, 3, 1))


def test_open_range_refuses_as_a_read_does(tmp_path):
    store = ChunkStore(tmp_path, 8 * B)
    data = os.urandom(2 * B)
    store.write(9, 0, data, 2)
    with pytest.raises(Conflict):
        store.open_range(9, 0, 10, min_version=3)  # a stale replica
    with pytest.raises(InvalidArgument):
        store.open_range(9, 2 * B + 1, 10)
    with pytest.raises(NotFound):
        store.open_range(10, 0, 10)
    os.truncate(store._paths(9)[0], B)  # the file lost its tail: corrupt, remembered
    with pytest.raises(CorruptData):
        store.open_range(9, B, 10)
    assert 9 in store.corrupt


def test_a_server_verified_read_fails_on_a_flipped_byte_or_a_short_file(tmp_path):
    store = ChunkStore(tmp_path, 8 * B)
    data = os.urandom(3 * B + 7)
    store.write(9, 0, data, 2)
    assert store.read(9, B - 3, B + 6) == data[B - 3 : 2 * B + 3]  # unaligned: its covering blocks checked
    path = store._paths(9)[0]
    with open(path, "r+b") as f:  # one byte of the third block
        f.seek(2 * B + 1)
        f.write(bytes([data[2 * B + 1] ^ 1]))
    assert store.read(9, 0, B) == data[:B]  # blocks the range does not cover are not read
    with pytest.raises(CorruptData, match="block 2"):
        store.read(9, 2 * B, 1)
    assert 9 in store.corrupt
    store.corrupt.clear()
    os.truncate(path, B)  # the file lost whole blocks: fewer bytes than the CRCs name
    with pytest.raises(CorruptData):
        store.read(9, 0, 3 * B)
    assert 9 in store.corrupt


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4 * B + 9), st.lists(st.integers(0, 2 * B), max_size=12), st.integers(0, 10**9))
def test_a_body_checked_as_it_arrives_checks_each_block_once_when_it_is_in(size, steps, flip):
    chunk = os.urandom(size)
    body, headers = _answer(chunk, 0, size)
    bad = bytearray(body)
    pos = flip % size
    bad[pos] ^= 0x40
    for data, broken in ((body, False), (memoryview(bad), True)):
        chk = rangecrc.Check(memoryview(data), 0, size, rangecrc.decode(headers["x-kubegfs-crcs"]))
        end = 0
        for step in [*steps, size]:
            end = min(size, end + step)
            whole = len(chk.crcs) if end == size else end // B  # the blocks that are in
            if broken and whole > pos // B:  # the bad block is in: caught now, not before
                with pytest.raises(CorruptData, match=f"block {pos // B} "):
                    chk.arrived(end)
                assert not chk.complete
                break
            chk.arrived(end)
            assert chk.checked == whole
        else:
            assert chk.complete and not broken


def test_block_crcs_are_8_hex_digits_each_and_nothing_else():
    assert rangecrc.decode(rangecrc.encode([0, 1, 0xDEADBEEF])) == [0, 1, 0xDEADBEEF]
    assert rangecrc.decode("DEADBEEF") == [0xDEADBEEF] and rangecrc.decode("") == []
    for text in ("00 00 01", "0000000", "+0000001", "0x000001", "0000000g"):
        with pytest.raises(CorruptData):
            rangecrc.decode(text)
