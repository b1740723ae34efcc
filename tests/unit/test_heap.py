"""Giving the C heap's free pages back to the kernel (the master does it after recovery)."""

import platform

import psutil
import pytest

from kubegfs.master.heap import trim_heap

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
