"""A piece written as the parts it arrived in stores and checksums exactly like the joined bytes."""

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs.chunkserver.store import ChunkStore, block_crcs
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
