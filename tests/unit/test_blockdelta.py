"""Blocks shipped as deltas against the blocks a holder has (kubegfs/blockdelta.py)."""

import random

import immutables
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merkle import V, big_dir, build_direct, mutate, random_spec

from kubegfs import blockdelta, merkle
from kubegfs import namespace as ns
from kubegfs.chunkserver.blocks import BlockStore
from kubegfs.errors import CorruptData
from kubegfs.master.snapshots import Encoded, groups, outgoing, pack_job


def holder_of(root):
    merkle.digest(root, V)
    return {dg: b for dg, b, _d in merkle.iter_blocks(root, V, lambda _d: False)}


def receive(holder, body):
    """What a holder with blocks ``holder`` makes of a batch (and stores)."""
    prefix = {d[:blockdelta.PREFIX]: d for d in holder}
    got = blockdelta.unpack(body, lambda p: holder[prefix[p]] if p in prefix else None)
    holder.update((dg, b) for dg, b, _z in got)
    return got


def write_in(root, parts, rng, t=99):
    f = ns.must_get(root, parts)
    return ns.replace(root, parts, ns.File(f.size + 1, t, f.mode, (rng.randrange(1 << 40),)), t)


@pytest.mark.parametrize("same_length", [True, False])
def test_a_delta_gives_the_block_back(same_length):
    base = bytes(range(256)) * 4
    data = bytearray(base)
    data[100:108] = b"changed!"
    if not same_length:
        data += b"more"
    kind, payload = blockdelta.delta(bytes(data), base)
    assert kind == (blockdelta.XOR if same_length else blockdelta.DICT)
    assert len(payload) < 60
    assert blockdelta.undelta(kind, payload, base) == bytes(data)


def test_a_big_directory_change_ships_small_deltas_that_rebuild_the_blocks():
    rng = random.Random(3)
    old = ns.Dir(immutables.Map({"big": big_dir(300, rng), "top": ns.File(1, 1, 0o644, ())}), 1, 0o755)
    holder = holder_of(old)
    name = sorted(ns.must_dir(old, ("big",)).children)[123]
    new = write_in(old, ("big", name), rng)
    merkle.digest(new, V)
    want = {dg: b for dg, b, _d in merkle.iter_blocks(new, V, holder.__contains__)}
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    assert [it.digest for it in items] == list(want)
    assert len(items) >= 3 and all(it.base is not None for it in items)  # leaf, index/head, root
    body = blockdelta.pack(items)
    whole = blockdelta.pack([blockdelta.Outgoing(dg, merkle.compress(b)) for dg, b in want.items()])
    assert len(body) * 3 < len(whole)
    got = receive(dict(holder), body)
    assert {dg: b for dg, b, _z in got} == want


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 10))
def test_whatever_changed_a_holder_rebuilds_exactly_the_blocks_it_lacks(rng, n):
    old = build_direct(random_spec(rng))
    holder = holder_of(old)
    new = mutate(old, rng, n)
    for _ in range(rng.randrange(4)):  # and entries of big directories: written, removed, added
        bigs = [p for p, x in ns.walk(new) if isinstance(x, ns.Dir) and len(x.children) >= 20]
        if not bigs:
            break
        p = rng.choice(bigs)
        name = rng.choice(sorted(ns.must_dir(new, p).children))
        if isinstance(ns.must_get(new, p + (name,)), ns.File) and rng.random() < 0.6:
            new = write_in(new, p + (name,), rng, rng.randrange(100, 200))
        elif rng.random() < 0.5:
            new = ns.replace(new, p + (name,), None, 150)
        else:
            new = ns.replace(new, p + (f"new{rng.randrange(10**6)}",), ns.File(1, 1, 0o644, ()), 150)
    merkle.digest(new, V)
    want = {dg: b for dg, b, _d in merkle.iter_blocks(new, V, holder.__contains__)}
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    assert [it.digest for it in items] == list(want)
    assert all(it.base is None or it.base in holder for it in items)
    got = receive(dict(holder), blockdelta.pack(items))
    assert {dg: b for dg, b, _z in got} == want


def test_a_batch_is_refused_whole_if_a_base_is_missing_or_a_block_does_not_match():
    rng = random.Random(5)
    old = ns.Dir(immutables.Map({"big": big_dir(200, rng)}), 1, 0o755)
    holder = holder_of(old)
    new = write_in(old, ("big", sorted(ns.must_dir(old, ("big",)).children)[7]), rng)
    merkle.digest(new, V)
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    body = blockdelta.pack(items)
    with pytest.raises(blockdelta.MissingBase):
        blockdelta.unpack(body, lambda _p: None)
    wrong = [items[0]._replace(digest=bytes(32)), *items[1:]]
    with pytest.raises(CorruptData):
        receive(dict(holder), blockdelta.pack(wrong))
    with pytest.raises(CorruptData):
        receive(dict(holder), body[:-3])
    with pytest.raises(CorruptData):
        receive(dict(holder), b"KGBX" + body[4:])


def test_a_block_store_keeps_delta_blocks_whole(tmp_path):
    rng = random.Random(9)
    old = ns.Dir(immutables.Map({"big": big_dir(200, rng)}), 1, 0o755)
    holder = holder_of(old)
    store = BlockStore(tmp_path)
    store.put([(dg, merkle.compress(b)) for dg, b in holder.items()])
    new = write_in(old, ("big", sorted(ns.must_dir(old, ("big",)).children)[50]), rng)
    merkle.digest(new, V)
    want = {dg: b for dg, b, _d in merkle.iter_blocks(new, V, holder.__contains__)}
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    assert store.put_delta(blockdelta.pack(items)) == (len(want), len(want))
    for it in items:  # a base can go: the blocks made from it are stored whole
        if it.base is not None:
            store.delete([it.base])
    again = BlockStore(tmp_path)  # and after a restart
    for s in (store, again):
        assert dict(merkle.unpack_frames(merkle.pack_frames(s.get(list(want)), compressed=True))) == want
    missing = BlockStore(tmp_path / "other")
    with pytest.raises(blockdelta.MissingBase):
        missing.put_delta(blockdelta.pack(items))
    assert missing.digests() == []


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 6), st.integers(300, 20_000))
def test_blocks_compressed_batch_by_batch_are_the_blocks_a_walk_compresses(rng, n, limit):
    """What ship_blocks sends (a walk that leaves whole blocks uncompressed, then batches each
    compressed and packed in turn) is what the walk sends compressed, in the same order."""
    old = build_direct(random_spec(rng))
    holder = holder_of(old) if n else {}
    new = mutate(old, rng, n) if n else old
    merkle.digest(new, V)
    want = outgoing(new, V, holder.__contains__, Encoded(prev=old if n else None), V)
    enc = Encoded(prev=old if n else None)
    items = outgoing(new, V, holder.__contains__, enc, V, deferred=True)
    assert [it.digest for it in items] == [it.digest for it in want]
    assert any(not it.payload for it in items) or not any(it.base is None for it in want)  # left to compress
    parts = groups(items, enc, limit)
    assert [it for p in parts for it in p] == items and all(parts)
    got = []
    for p in parts:
        batch, body = pack_job(p, enc)
        assert len(p) == 1 or len(body) <= 2 * limit + 64 * len(p)  # about the limit (a half-size estimate)
        assert blockdelta.pack(batch) == body
        got += batch
    assert got == want
    received = receive(dict(holder), blockdelta.pack(got))
    assert [dg for dg, _b, _z in received] == [it.digest for it in want]


def test_counterparts_do_not_enter_a_directory_whose_blocks_are_prepared():
    rng = random.Random(3)
    old = ns.Dir(immutables.Map({
        d: ns.Dir(immutables.Map({s: ns.Dir(immutables.Map({f"f{i}": ns.File(i, 1, 0o644, (i + 1,)) for i in range(5)}), 1)
                                  for s in ("x", "y")}), 1)
        for d in ("a", "b")}), 1)
    merkle.digest(old, V)
    new = write_in(write_in(old, ("a", "x", "f1"), rng), ("b", "y", "f2"), rng)
    merkle.digest(new, V)
    a = ns.must_get(new, ("a",))
    every = blockdelta.counterparts(old, new)
    assert set(every) == {id(new), id(a), id(ns.must_get(new, ("a", "x"))), id(ns.must_get(new, ("b",))),
                          id(ns.must_get(new, ("b", "y")))}
    assert a.digest is not None
    some = blockdelta.counterparts(old, new, {a.digest: None})  # "a" and all below it prepared
    assert some == {k: v for k, v in every.items() if k not in (id(a), id(ns.must_get(new, ("a", "x"))))}


def test_frames_of_every_kind_come_back_in_order_and_a_delta_of_another_length_is_refused():
    base = bytes(range(256)) * 4
    same, longer, whole = bytearray(base), bytearray(base) + b"more", b"a block sent whole"
    same[10:14] = b"edit"
    items = []
    for data in (bytes(same), bytes(longer), whole):
        dg = merkle.block_digest(data)
        if data is whole:
            items.append(blockdelta.Outgoing(dg, merkle.compress(data)))
        else:
            kind, payload = blockdelta.delta(data, base)
            items.append(blockdelta.Outgoing(dg, payload, merkle.block_digest(base), kind))
    holder = {merkle.block_digest(base): base}
    got = receive(dict(holder), blockdelta.pack(items))
    assert [(b, z is not None) for _dg, b, z in got] == [(bytes(same), False), (bytes(longer), False), (whole, True)]
    assert [it.kind for it in items] == [blockdelta.XOR, blockdelta.DICT, blockdelta.WHOLE]
    short = {merkle.block_digest(base): base[:-1]}  # an XOR delta against a base of another length
    with pytest.raises(CorruptData, match="length"):
        blockdelta.unpack(blockdelta.pack(items[:1]), lambda _p: short[merkle.block_digest(base)])
    with pytest.raises(CorruptData, match="kind"):
        blockdelta.unpack(blockdelta.pack([items[2]._replace(kind=7)]), lambda _p: None)
