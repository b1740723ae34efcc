"""Directory blocks a chunkserver stored or read lately, whole and verified, kept in memory as
delta bases.

A block sent as a delta (see blockdelta) is rebuilt from its base, the older block at its place,
which its holder would otherwise read from its pack, decompress and hash again. A block enters
this cache only once it has been checked against its digest (on receipt, or when it was read
from disk), so taking a base from here is taking a verified block; a block read from disk is
verified on that read as before. Bounded by bytes (each entry counted with its bookkeeping),
least recently used out first; a block deleted from the store leaves it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

DEFAULT_BYTES = 128 << 20  # every block of a ~1.4M-file tree (per million files ~86k blocks of ~935 B)
ENTRY_OVERHEAD = 160  # bytes of an entry beside its block: the key, the bytes objects' heads, the map's slot


class BlockCache:
    def __init__(self, limit: int = DEFAULT_BYTES) -> None:
        self.limit = max(0, limit)
        self.size = 0
        self._m: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._m)

    def get(self, dg: bytes) -> bytes | None:
        # without the lock: each OrderedDict call is atomic, and one that lost its key to a
        # concurrent add's eviction or a discard leaves a miss or a hit that is no longer counted
        m = self._m
        blk = m.get(dg)
        if blk is not None:
            try:
                m.move_to_end(dg)
            except KeyError:
                pass
        return blk

    def add(self, items: list[tuple[bytes, bytes]]) -> None:
        """Keep these verified (digest, block) pairs, the last the most recent."""
        if not self.limit:
            return
        with self._lock:
            m = self._m
            for dg, blk in items:
                cost = len(blk) + ENTRY_OVERHEAD
                if cost > self.limit:
                    continue
                old = m.pop(dg, None)
                if old is not None:
                    self.size -= len(old) + ENTRY_OVERHEAD
                m[dg] = blk
                self.size += cost
            while self.size > self.limit:
                _dg, old = m.popitem(last=False)
                self.size -= len(old) + ENTRY_OVERHEAD

    def discard(self, dg: bytes) -> None:
        with self._lock:
            old = self._m.pop(dg, None)
            if old is not None:
                self.size -= len(old) + ENTRY_OVERHEAD
