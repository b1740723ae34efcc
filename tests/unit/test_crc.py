"""The chunk blocks' CRC32 (kubegfs/crc.py) is zlib's, whichever implementation computes it:
the values already in every chunk's metadata stay valid."""

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kubegfs.crc import crc32


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200_000), st.integers(0, 200_000))
def test_crc32_is_zlibs_whole_and_continued(data, cut):
    cut = min(cut, len(data))
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[cut:], crc32(data[:cut])) == zlib.crc32(data)
