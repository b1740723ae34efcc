"""Blocks prepared ahead of a snapshot (kubegfs/master/snapshots.py: prepare, ahead_job, the warm
passes): the snapshot's collect ships exactly the blocks a walk finds the holder lacks, each
rebuilt at the holder, taking the prepared bytes only where the holder has their base."""

import asyncio
import random
import threading
from types import SimpleNamespace

import immutables
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_blockdelta import holder_of, receive, write_in
from test_merkle import V, big_dir, build_direct, mutate, random_spec

from kubegfs import blockdelta, merkle
from kubegfs import namespace as ns
from kubegfs.master import snapshots
from kubegfs.master.snapshots import Encoded, Snapshots, ahead_job, outgoing, prepare


def two_big(rng):
    return ns.Dir(immutables.Map({"a": big_dir(300, rng), "b": big_dir(200, rng, "g-"),
                                  "top": ns.File(1, 1, 0o644, ())}), 1, 0o755)


def some_name(root, d, rng):
    return rng.choice(sorted(ns.must_dir(root, (d,)).children))


def changes(root, rng, n):
    """``n`` files written in the big directories, each step's tree."""
    out = []
    for _ in range(n):
        d = rng.choice("ab")
        root = write_in(root, (d, some_name(root, d, rng)), rng, rng.randrange(100, 200))
        out.append(root)
    return out


def collect(new, old, holder, ahead):
    """What the snapshot of ``new`` ships a holder with the blocks ``holder``, with the blocks
    ``ahead`` prepared: exactly those it lacks, children before parents, each rebuilt there."""
    merkle.digest(new, V)
    blocks, raw = ahead
    items = outgoing(new, V, holder.__contains__, Encoded(prev=old, ahead=blocks, ahead_raw=raw), V)
    want = {dg: b for dg, b, _d in merkle.iter_blocks(new, V, holder.__contains__)}
    assert sorted(it.digest for it in items) == sorted(want)
    before: set[bytes] = set()
    for it in items:  # a block after every block it names that the holder lacks
        assert all(c in before for c in merkle.child_digests(want[it.digest]) if c in want)
        before.add(it.digest)
    assert all(it.base is None or it.base in holder for it in items)
    assert {dg: b for dg, b, _z in receive(dict(holder), blockdelta.pack(items))} == want
    return items


def test_passes_after_each_change_prepare_what_the_snapshot_ships():
    rng = random.Random(11)
    old = two_big(rng)
    holder = holder_of(old)
    had = ({}, {})
    steps = changes(old, rng, 8)
    for live in steps[:-2]:  # a pass after each change but the last two
        merkle.digest(live, V)
        got = prepare(live, old, V, holder.__contains__, V, had)
        assert got is not None and set(had[0]) <= set(got[0]) and set(got[0]) == set(got[1])
        assert all(merkle.block_digest(b) == dg for dg, b in got[1].items())
        had = got
    new = steps[-1]
    items = collect(new, old, holder, had)
    plain = outgoing(new, V, holder.__contains__, Encoded(prev=old), V)
    assert sum(it is had[0].get(it.digest) for it in items) >= len(items) // 2  # most came prepared
    assert len(blockdelta.pack(items)) <= 1.2 * len(blockdelta.pack(plain))  # deltas as small


def prepared_once(seed):
    """(the old tree, a holder of its blocks, the live tree 3 changes on, its blocks prepared)."""
    rng = random.Random(seed)
    old = two_big(rng)
    holder = holder_of(old)
    live = changes(old, rng, 3)[-1]
    merkle.digest(live, V)
    return old, holder, live, prepare(live, old, V, holder.__contains__, V, ({}, {}))


def test_a_prepared_delta_whose_base_the_holder_lacks_is_made_again():
    old, holder, live, had = prepared_once(12)
    assert had[0] and any(it.base is not None for it in had[0].values())
    lost = {it.base for it in had[0].values() if it.base is not None}
    lacking = {dg: b for dg, b in holder.items() if dg not in lost}  # lost every base a delta uses
    items = collect(live, old, lacking, had)
    assert all(it.base not in lost for it in items)


def test_prepared_bytes_never_decide_what_is_shipped():
    old, holder, live, had = prepared_once(13)
    has_new = dict(holder)  # a holder that has some of the new blocks already (an earlier build's)
    has_new.update({dg: b for dg, b, _d in list(merkle.iter_blocks(live, V, holder.__contains__))[:3]})
    items = collect(live, old, has_new, had)
    assert not any(it.digest in has_new for it in items)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 8))
def test_whatever_changed_between_passes_the_holder_rebuilds_exactly_what_it_lacks(rng, n):
    old = build_direct(random_spec(rng))
    holder = holder_of(old)
    had = ({}, {})
    live = old
    for _ in range(rng.randrange(1, 4)):
        live = mutate(live, rng, n)
        merkle.digest(live, V)
        got = prepare(live, old, V, holder.__contains__, V, had)
        had = got if got is not None else ({}, {})
    new = mutate(live, rng, rng.randrange(3))
    collect(new, old, holder, had)


def test_a_big_change_prepares_nothing(monkeypatch):
    monkeypatch.setattr(snapshots, "AHEAD_MAX", 4)
    rng = random.Random(14)
    old = two_big(rng)
    holder = holder_of(old)
    live = changes(old, rng, 6)[-1]
    merkle.digest(live, V)
    assert prepare(live, old, V, holder.__contains__, V, ({}, {})) is None


def test_a_pass_stops_once_a_snapshot_waits_for_it():
    rng = random.Random(15)
    old = two_big(rng)
    holder = holder_of(old)
    live = changes(old, rng, 2)[-1]
    stop = threading.Event()
    pairs = [("/p", "s-1", live, old, ({}, {})), ("/q", "s-2", live, old, ({}, {}))]
    assert [r[0] for r in ahead_job(pairs, V, holder.__contains__, V, stop)] == ["/p", "/q"]
    stop.set()
    assert ahead_job(pairs, V, holder.__contains__, V, stop) == []  # nothing half made is kept
    with pytest.raises(snapshots._Stopped):
        prepare(changes(live, rng, 1)[-1], old, V, holder.__contains__, V, ({}, {}), stop)


def test_the_warm_pass_prepares_the_snapshotted_paths_blocks(monkeypatch):
    monkeypatch.setattr(snapshots, "WARM_AFTER", 0.001)
    rng = random.Random(16)
    snap = two_big(rng)
    root = ns.Dir(immutables.Map({"d": snap}), 1, 0o755)
    holder = holder_of(snap)

    async def go():
        m = SimpleNamespace(state=SimpleNamespace(root=root, version={}, blocks=dict.fromkeys(holder, 1)))
        s = Snapshots(m)  # type: ignore[arg-type]
        monkeypatch.setattr(s, "_live_version", V)
        m.state.version = _Versions()
        s.latest["/d"] = ("s-1", snap)
        s.latest["/gone"] = ("s-0", snap)
        s.ahead["/gone"] = ("s-0", b"", ({}, {}))
        live = changes(snap, rng, 3)[-1]
        m.state.root = ns.Dir(immutables.Map({"d": live}), 1, 0o755)
        del s.latest["/gone"]
        s.changed()
        while s._warm_timer is not None or s._warming is not None:
            await asyncio.sleep(0.001)
        return s, live

    s, live = asyncio.run(go())
    assert "/gone" not in s.ahead
    sid, dg, had = s.ahead["/d"]
    assert sid == "s-1" and dg == merkle.digest(live, V)
    assert set(had[0]) == {d for d, _b, _n in merkle.iter_blocks(live, V, holder.__contains__)}
    assert s.ahead_of("/d", "s-1") is had and s.ahead_of("/d", "s-9") == ({}, {})


class _Versions(dict):
    def __getitem__(self, h):
        return V(h)
