"""Client-verified reads: the stored block CRCs a chunkserver sends along with a range of a
chunk, and the client's check of the bytes against them.

A chunk is checksummed in BLOCK_SIZE blocks (formats.py). A client-verified read of any range
is answered with the whole blocks that cover it, straight from the chunk file (the chunkserver's
data port sends them with ``sendfile``: no copy and no CRC pass on the server), and with those
blocks' CRCs as the chunkserver stored them when the bytes were written. The client checks
every block before it hands out a byte, so corruption on the disk and on the wire are both
caught end to end (HDFS's DataNode sends its stored checksums with ``transferTo`` and its client
verifies them the same way). The answer's headers:

- ``X-Kubegfs-Base``: where the body starts in the chunk (a multiple of BLOCK_SIZE);
- ``X-Kubegfs-Crcs``: the body's blocks' CRC32s, 8 hex digits each, in order;
- ``X-Kubegfs-Chunk-Length``: the chunk's length (only the chunk's last block may be short).
"""

from __future__ import annotations

from collections.abc import Sequence

from .crc import crc32
from .errors import CorruptData
from .formats import BLOCK_SIZE

VERIFY_HEADER = "X-Kubegfs-Verify"  # a request's "client": the client verifies (data port GETs)
READ_PORT_HEADER = "X-Kubegfs-Read-Port"  # a main-port read's answer: where client-verified reads go
BASE_HEADER = "X-Kubegfs-Base"
CRCS_HEADER = "X-Kubegfs-Crcs"
LENGTH_HEADER = "X-Kubegfs-Chunk-Length"


def covering(offset: int, length: int, size: int) -> tuple[int, int]:
    """The blocks covering ``length`` bytes at ``offset`` of a chunk of ``size`` bytes (clamped
    to it), as (index of the first block, number of blocks)."""
    first = offset // BLOCK_SIZE
    end = min(size, offset + length)
    if end <= offset:
        return first, 0
    return first, (end - 1) // BLOCK_SIZE + 1 - first


def span(first: int, count: int, size: int) -> tuple[int, int]:
    """Where ``count`` blocks from block ``first`` start in a chunk of ``size`` bytes, and how
    many bytes they are (the chunk's last block may be short)."""
    base = first * BLOCK_SIZE
    return base, max(0, min(size, base + count * BLOCK_SIZE) - base)


def encode(crcs: Sequence[int]) -> str:
    return "".join(f"{c:08x}" for c in crcs)


def decode(text: str) -> list[int]:
    """CorruptData if ``text`` is not 8 hex digits per CRC (the answer cannot be checked)."""
    if len(text) % 8:
        raise CorruptData("malformed block CRCs in the answer")
    try:
        return [int(text[i : i + 8], 16) for i in range(0, len(text), 8)]
    except ValueError:
        raise CorruptData("malformed block CRCs in the answer") from None


def check(body: memoryview, base: int, size: int, crcs: Sequence[int]) -> None:
    """Raise CorruptData unless ``body`` is whole blocks of a chunk of ``size`` bytes starting
    at ``base`` (only the chunk's last block short) and every block matches its CRC."""
    n = len(body)
    if base % BLOCK_SIZE or base + n > size or (n % BLOCK_SIZE and base + n != size):
        raise CorruptData(f"the answer is not whole blocks: {n} bytes at {base} of {size}")
    if len(crcs) != -(-n // BLOCK_SIZE):
        raise CorruptData(f"{len(crcs)} block CRCs for {n} bytes")
    for i, crc in enumerate(crcs):
        if crc32(body[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) != crc:
            raise CorruptData(f"block {base // BLOCK_SIZE + i} failed its checksum")


def cut(body: memoryview, base: int, offset: int, length: int) -> memoryview:
    """The ``length`` bytes at ``offset`` (fewer at the chunk's end) of a body read from ``base``."""
    start = offset - base
    return body[start : start + length]
