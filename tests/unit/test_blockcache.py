"""Recent directory blocks kept in memory as delta bases (kubegfs/chunkserver/blockcache.py) and
how the block store uses them."""

import random

import immutables
import pytest
from test_blockdelta import holder_of, write_in
from test_merkle import V, big_dir

from kubegfs import blockdelta, merkle
from kubegfs import namespace as ns
from kubegfs.chunkserver import blocks as blocks_mod
from kubegfs.chunkserver.blockcache import ENTRY_OVERHEAD, BlockCache
from kubegfs.chunkserver.blocks import BlockStore
from kubegfs.master.snapshots import Encoded, outgoing


def test_the_cache_is_bounded_by_bytes_and_drops_the_least_recently_used():
    c = BlockCache(3 * (100 + ENTRY_OVERHEAD))
    c.add([(b"a", b"x" * 100), (b"b", b"y" * 100), (b"c", b"z" * 100)])
    assert c.get(b"a") == b"x" * 100  # a is now the most recent
    c.add([(b"d", b"w" * 100)])
    assert c.get(b"b") is None and len(c) == 3
    assert [c.get(k) is not None for k in (b"a", b"c", b"d")] == [True, True, True]
    c.add([(b"a", b"x" * 100)])  # again: counted once
    assert c.size == 3 * (100 + ENTRY_OVERHEAD)
    c.discard(b"c")
    c.discard(b"c")
    assert c.get(b"c") is None and c.size == 2 * (100 + ENTRY_OVERHEAD)
    c.add([(b"big", b"q" * 10_000)])  # larger than the whole cache: not kept, nothing dropped for it
    assert c.get(b"big") is None and len(c) == 2
    off = BlockCache(0)
    off.add([(b"a", b"x")])
    assert off.get(b"a") is None and off.size == 0


def _changed(tmp_path, cache_bytes):
    rng = random.Random(5)
    old = ns.Dir(immutables.Map({"big": big_dir(200, rng)}), 1, 0o755)
    holder = holder_of(old)
    store = BlockStore(tmp_path, cache_bytes)
    store.put([(dg, merkle.compress(b)) for dg, b in holder.items()])
    new = write_in(old, ("big", sorted(ns.must_dir(old, ("big",)).children)[50]), rng)
    merkle.digest(new, V)
    want = {dg: b for dg, b, _d in merkle.iter_blocks(new, V, holder.__contains__)}
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    assert any(it.base is not None for it in items)
    return store, items, want


def _reads(store, monkeypatch):
    seen = []
    real = store._read

    def spy(dg, fds):
        seen.append(dg)
        return real(dg, fds)

    monkeypatch.setattr(store, "_read", spy)
    return seen


def test_a_delta_takes_its_base_from_the_blocks_stored_lately_without_reading_its_pack(tmp_path, monkeypatch):
    store, items, want = _changed(tmp_path, 1 << 20)
    seen = _reads(store, monkeypatch)
    assert store.put_delta(blockdelta.pack(items)) == (len(want), len(want))
    assert seen == []
    for dg, blk in want.items():  # the rebuilt blocks are kept too, as the next snapshot's bases
        assert store.recent.get(dg) == blk
    assert dict(merkle.unpack_frames(merkle.pack_frames(store.get(list(want)), compressed=True))) == want


def test_without_the_cache_a_base_is_read_from_its_pack_verified_and_a_damaged_one_refused(tmp_path, monkeypatch):
    store, items, want = _changed(tmp_path, 0)
    seen = _reads(store, monkeypatch)
    body = blockdelta.pack(items)
    bases = {it.base for it in items if it.base is not None}
    for dg in bases:  # damage every base on disk
        name, off, ln = store.index[dg]
        with open(store.dir / name, "r+b") as f:
            f.seek(off + ln // 2)
            b = f.read(1)
            f.seek(off + ln // 2)
            f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(blockdelta.MissingBase):
        store.put_delta(body)
    assert seen and set(seen) <= bases and store.dropped & bases  # read, failed its digest, dropped
    assert store.missing(list(want)) == list(want)


def test_a_base_read_from_disk_enters_the_cache_and_a_scrub_does_not_fill_it(tmp_path):
    rng = random.Random(3)
    old = ns.Dir(immutables.Map({"big": big_dir(100, rng)}), 1, 0o755)
    holder = holder_of(old)
    BlockStore(tmp_path).put([(dg, merkle.compress(b)) for dg, b in holder.items()])
    store = BlockStore(tmp_path)  # restarted: nothing in memory
    assert len(store.recent) == 0
    some = list(holder)[:3]
    store.get(some, remember=False)
    assert len(store.recent) == 0
    store.get(some)
    assert [store.recent.get(d) for d in some] == [holder[d] for d in some]
    store.delete(some[:1])
    assert store.recent.get(some[0]) is None


def test_blocks_rebuilt_from_deltas_are_stored_at_the_store_level(tmp_path):
    store, items, want = _changed(tmp_path, 1 << 20)
    store.put_delta(blockdelta.pack(items))
    rebuilt = [it.digest for it in items if it.base is not None]
    stored = dict(store.get(rebuilt))  # compressed as stored, each verified
    assert stored == {dg: merkle.compress(want[dg], blocks_mod.STORE_LEVEL) for dg in rebuilt}
    assert stored != {dg: merkle.compress(want[dg]) for dg in rebuilt}  # not the shipping level
    again = BlockStore(tmp_path)  # read back from the packs after a restart, each verified
    assert dict(merkle.unpack_frames(merkle.pack_frames(again.get(list(want)), compressed=True))) == want


def test_gets_beside_adds_and_discards_in_other_threads_keep_the_count_of_bytes_exact():
    import threading

    c = BlockCache(50 * (64 + ENTRY_OVERHEAD))
    keys = [bytes([i]) * 32 for i in range(200)]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for k in keys:
                got = c.get(k)
                assert got is None or got == k * 2

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(3000):
            k = rng.choice(keys)
            if rng.random() < 0.3:
                c.discard(k)
            else:
                c.add([(k, k * 2)])

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert c.size == len(c) * (64 + ENTRY_OVERHEAD) <= c.limit
