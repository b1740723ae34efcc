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

import struct
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
    raw = b""
    if not len(text) % 8:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            pass
    if len(raw) * 2 != len(text):  # (fromhex also takes spaces between bytes: not here)
        raise CorruptData("malformed block CRCs in the answer")
    return list(struct.unpack(f">{len(raw) // 4}I", raw))


class Check:
    """``check`` of a body that is still arriving: ``arrived(end)`` checks every block that is
    whole in ``body[:end]`` and not checked yet (the last, short one once ``end`` is the body's
    length), so each block is checked right after it is received, while it is in the CPU's
    cache. Raises CorruptData as ``check`` does; the body's shape is checked on creation."""

    def __init__(self, body: memoryview, base: int, size: int, crcs: Sequence[int]) -> None:
        n = len(body)
        if base % BLOCK_SIZE or base + n > size or (n % BLOCK_SIZE and base + n != size):
            raise CorruptData(f"the answer is not whole blocks: {n} bytes at {base} of {size}")
        if len(crcs) != -(-n // BLOCK_SIZE):
            raise CorruptData(f"{len(crcs)} block CRCs for {n} bytes")
        self.body, self.base, self.crcs = body, base, crcs
        self.checked = 0  # blocks checked, from the first

    @property
    def complete(self) -> bool:
        return self.checked == len(self.crcs)

    def arrived(self, end: int) -> None:
        body, crcs, i = self.body, self.crcs, self.checked
        last = len(crcs) if end >= len(body) else end // BLOCK_SIZE
        while i < last:
            if crc32(body[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) != crcs[i]:
                self.checked = i
                raise CorruptData(f"block {self.base // BLOCK_SIZE + i} failed its checksum")
            i += 1
        self.checked = i


def check(body: memoryview, base: int, size: int, crcs: Sequence[int]) -> None:
    """Raise CorruptData unless ``body`` is whole blocks of a chunk of ``size`` bytes starting
    at ``base`` (only the chunk's last block short) and every block matches its CRC."""
    Check(body, base, size, crcs).arrived(len(body))


def cut(body: memoryview, base: int, offset: int, length: int) -> memoryview:
    """The ``length`` bytes at ``offset`` (fewer at the chunk's end) of a body read from ``base``."""
    start = offset - base
    return body[start : start + length]
