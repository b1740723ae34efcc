"""A piece written as the parts it arrived in stores and checksums exactly like the joined bytes."""

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs.chunkserver.store import ChunkStore, block_crcs
from kubegfs.errors import Conflict
from kubegfs.formats import BLOCK_SIZE


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3 * BLOCK_SIZE + 17), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_block_crcs_of_parts_equal_the_joined_blocks(data, cuts):
    want = [zlib.crc32(data[i:i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)]
    assert list(block_crcs(_split(data, cuts))) == want


def test_parts_write_reads_back_and_verifies(tmp_path):
    store = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    data = bytes(range(256)) * (BLOCK_SIZE * 2 // 256) + b"tail"
    parts = _split(data, [5, BLOCK_SIZE - 1, BLOCK_SIZE + 3, 70_000])
    assert store.write(7, 0, parts, 1, sync=False) == len(data)
    more = [b"x" * 100, b"y" * (BLOCK_SIZE - 50)]  # an unaligned append, in parts
    assert store.write(7, len(data), more, 1, sync=True) == len(data) + BLOCK_SIZE + 50
    assert store.read(7, 0, 1 << 30) == data + b"".join(more)
    assert store.verify(7)
    ref = ChunkStore(tmp_path / "ref", 4 * BLOCK_SIZE)
    ref.write(7, 0, data + b"".join(more), 1)
    assert store._meta(7) == ref._meta(7)


def test_a_streamed_piece_stores_what_a_whole_write_stores(tmp_path):
    store = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    ref = ChunkStore(tmp_path / "ref", 4 * BLOCK_SIZE)
    head = b"h" * (BLOCK_SIZE + 10)
    store.write(3, 0, head, 1, sync=True)
    ref.write(3, 0, head, 1, sync=True)
    body = bytes(range(256)) * (BLOCK_SIZE // 128) + b"end"
    w = store.writer(3, len(head), 1, len(body))
    try:
        for part in _split(body, [1, 999, BLOCK_SIZE + 7]):
            w.feed([part])
            assert store.read(3, 0, 1 << 30) == head  # not part of the chunk until finish
        assert store.finish(w, sync=True) == len(head) + len(body)
    finally:
        w.close()
    ref.write(3, len(head), body, 1, sync=True)
    assert store.read(3, 0, 1 << 30) == head + body
    assert store._read_meta(3) == ref._read_meta(3)  # synced: the metadata on disk says so


def test_a_writer_closed_without_finish_changes_nothing(tmp_path):
    store = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    store.write(3, 0, b"a" * 100, 1, sync=True)
    w = store.writer(3, 100, 1, 5000)
    w.feed([b"b" * 3000])  # the body broke off here
    w.close()
    assert store.read(3, 0, 1 << 30) == b"a" * 100 and store.verify(3)
    assert store.write(3, 100, b"c" * 10, 1, sync=True) == 110  # the next write overwrites the rest
    assert store.read(3, 0, 1 << 30) == b"a" * 100 + b"c" * 10
    assert ChunkStore(tmp_path, 4 * BLOCK_SIZE).read(3, 0, 1 << 30) == b"a" * 100 + b"c" * 10


def test_a_writer_whose_chunk_was_deleted_or_rewritten_meanwhile_is_refused(tmp_path):
    store = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    store.write(3, 0, b"a" * 100, 1, sync=True)
    w = store.writer(3, 100, 1, 10)
    w.feed([b"b" * 10])
    store.delete(3)
    with pytest.raises(Conflict):
        store.finish(w, sync=True)
    w.close()
    assert 3 not in store.index
    store.write(4, 0, b"a" * 100, 1, sync=True)
    w = store.writer(4, 100, 1, 10)
    store.write(4, 100, b"x" * 50, 1, sync=True)  # another writer got there first
    with pytest.raises(Conflict):
        store.finish(w, sync=False)
    w.close()
    assert store.read(4, 0, 1 << 30) == b"a" * 100 + b"x" * 50


def test_unsynced_streamed_pieces_are_not_on_disk_metadata(tmp_path):
    """A streamed piece without sync is the chunk's in memory only: after a restart the chunk is
    back at its last synced length (the metadata on disk only describes synced bytes)."""
    store = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    store.write(5, 0, b"a" * 100, 1, sync=True)
    w = store.writer(5, 100, 1, 50)
    w.feed([b"b" * 50])
    assert store.finish(w, sync=False) == 150
    w.close()
    assert store.read(5, 0, 1 << 30) == b"a" * 100 + b"b" * 50
    again = ChunkStore(tmp_path, 4 * BLOCK_SIZE)
    assert again.read(5, 0, 1 << 30) == b"a" * 100 and again.verify(5)
