"""Giving the C heap's free pages back to the kernel (the master does it after recovery)."""

import platform

import psutil
import pytest

from kubegfs.heap import keep_heap, trim_heap

BIG_BLOCKS = """
import sys
import psutil
from kubegfs.heap import map_big_blocks
raise_threshold = bytearray(20 << 20)  # freed: glibc now serves blocks below 20 MiB from its heap
del raise_threshold
if sys.argv[1] == "map":
    assert map_big_blocks()
blocks = [bytearray(2 << 20) for _ in range(48)]
pin = bytearray(300_000)  # a live block above them
me = psutil.Process()
before = me.memory_info().rss
del blocks
print((before - me.memory_info().rss) >> 20)
"""

MiB = 1 << 20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_pages_freed_below_live_objects_leave_rss():
    blocks = [bytearray(4000) for _ in range(40_000)]  # ~160 MiB from malloc (too big for pymalloc)
    kept = blocks[::32]  # a live block every 128 KiB: the heap's top cannot shrink past them
    del blocks
    me = psutil.Process()
    before = me.memory_info().rss
    assert trim_heap()
    assert before - me.memory_info().rss > 64 * MiB
    assert len(kept) == 1250


def test_the_master_trims_the_heap_once_it_has_recovered(tmp_path, monkeypatch):
    from kubegfs.auth import Tokens
    from kubegfs.master import server
    from kubegfs.topology import Location

    calls: list[int] = []
    monkeypatch.setattr(server, "trim_heap", lambda: calls.append(1) or True)
    m = server.Master(tmp_path, Tokens("t" * 32, "i" * 32, "m" * 32), Location("n", "z", "r", "127.0.0.1"),
                      1 << 20, 1)
    m.oplog.close()
    assert calls == [1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_big_blocks_leave_rss_as_they_are_freed_once_mapped_on_their_own():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def freed_mib(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", BIG_BLOCKS, how], env=env, capture_output=True,
                             text=True, check=True)
        return int(out.stdout)

    assert freed_mib("map") > 80  # 96 MiB freed, all of it gone from RSS
    assert freed_mib("heap") < 32  # glibc's default: kept below the live block


def test_a_chunkserver_keeps_its_heap_where_malloc_is_glibc():
    # glibc: mallopt accepted both settings; elsewhere there is no mallopt to call
    assert keep_heap() is (platform.libc_ver()[0] == "glibc")
