"""A snapshot's long poll is answered as soon as its commit is durable (before the build's last
steps), the second holder of a build takes the first one's walk when it would answer every
question of it alike, and a small change's one batch is packed on the loop; without servers."""

import asyncio
import random
from types import SimpleNamespace

import immutables

from kubegfs import blockdelta
from kubegfs import namespace as ns
from kubegfs.master import snapshots
from kubegfs.master.snapshots import Encoded, Snapshots, Walk, inline_pack


def _snapshots(entries):
    m = SimpleNamespace(oplog=SimpleNamespace(failed=None), chunkmap=SimpleNamespace(cs={}),
                        state=SimpleNamespace(snapshots=entries))
    return Snapshots(m)  # type: ignore[arg-type]


def test_the_long_poll_is_answered_once_the_commit_is_durable_before_the_builds_last_steps():
    entry = {"id": "s1", "name": "a", "path": "/p", "state": "pending", "holders": []}
    s = _snapshots({"s1": entry})
    order: list[object] = []

    async def main() -> None:
        durable = asyncio.Event()

        async def build(sid: str) -> None:
            await durable.wait()
            entry["state"] = "ready"  # the commit's apply
            order.append(("applied", s.snap_json(entry)["state"]))  # type: ignore[arg-type]
            s._answer(sid, durable=True)
            await asyncio.sleep(0)
            order.append("last steps")
            await asyncio.sleep(0.05)

        s.build = build  # type: ignore[method-assign]
        s.start_builder("s1")

        async def poll() -> None:
            await s.wait_built("s1", 5)
            order.append(("answered", s.snap_json(entry)["state"]))  # type: ignore[arg-type]

        p = asyncio.ensure_future(poll())
        await asyncio.sleep(0.01)
        assert order == [] and len(s.waiting["s1"]) == 1
        durable.set()
        await p
        assert not s.builders["s1"].done()  # answered while the build still runs
        await s.builders["s1"]

    asyncio.run(main())
    assert order == [("applied", "pending"), ("answered", "ready"), "last steps"]
    assert s.waiting == {}


def test_a_long_poll_that_times_out_leaves_no_waiter_behind():
    entry = {"id": "s1", "name": "a", "path": "/p", "state": "pending", "holders": []}
    s = _snapshots({"s1": entry})

    async def main() -> str:
        never = asyncio.Event()

        async def build(_sid: str) -> None:
            await never.wait()

        s.build = build  # type: ignore[method-assign]
        s.start_builder("s1")
        await s.wait_built("s1", 0.02)
        state = s.snap_json(entry)["state"]  # type: ignore[arg-type]
        assert s.waiting == {"s1": []}
        s.builders["s1"].cancel()
        return state

    assert asyncio.run(main()) == "pending"


def test_a_walk_is_reused_only_by_a_holder_that_answers_every_question_alike():
    rng = random.Random(5)
    for _ in range(300):
        universe = [bytes([i]) * 4 for i in range(40)]
        known = {d for d in universe if rng.random() < 0.6}
        counted = {d: object() for d in universe if rng.random() < 0.7}
        asked = rng.sample(universe, rng.randrange(0, 20))
        first_known = {d for d in universe if rng.random() < 0.5} if rng.random() < 0.5 else known

        def skip(d, k, counted=counted):
            return d in k and d in counted

        walk = Walk([d for d in asked if skip(d, first_known)], [d for d in asked if not skip(d, first_known)], [], 7)
        assert len(walk) == len(asked)
        same = all(skip(d, known) == skip(d, first_known) for d in asked)
        assert walk.alike(known, counted, 7) == walk.alike(known, counted, 8) == same
        if walk.had and same:  # a block it had released since (the catalog's generation moved)
            del counted[walk.had[0]]
            assert not walk.alike(known, counted, 8)


def test_remember_tree_lets_go_of_trees_past_the_kept_ones():
    def snap_tree(i):
        return ns.Dir(immutables.Map({"f": ns.File(i, 1, 0o644, ())}), 1)

    entries = {f"s{i}": {"id": f"s{i}", "path": "/p"} for i in range(4)}
    s = _snapshots(entries)
    trees = [snap_tree(i) for i in range(4)]
    assert s.remember_tree("/p", "s0", trees[0]) == []
    assert s.remember_tree("/p", "s1", trees[1]) == []
    assert s.remember_tree("/p", "s2", trees[2]) == [trees[0]]
    del entries["s1"]  # deleted from the catalog meanwhile
    assert s.remember_tree("/p", "s3", trees[3]) == [trees[1]]
    assert s.trees == {"s2": trees[2], "s3": trees[3]} and s.latest["/p"] == ("s3", trees[3])


def test_only_a_small_batch_is_packed_on_the_loop(monkeypatch):
    monkeypatch.setattr(snapshots, "INLINE_PACK", 4)
    monkeypatch.setattr(snapshots, "INLINE_PACK_RAW", 100)
    enc = Encoded()
    prepared = [blockdelta.Outgoing(bytes([i]) * 32, b"z") for i in range(4)]
    assert inline_pack(prepared, enc)
    assert not inline_pack([*prepared, blockdelta.Outgoing(b"\x09" * 32, b"z")], enc)  # too many blocks
    enc.todo[b"\x08" * 32] = b"x" * 60  # whole blocks left to compress: 60 bytes, then 120
    enc.todo[b"\x07" * 32] = b"x" * 60
    assert inline_pack([prepared[0], blockdelta.Outgoing(b"\x08" * 32, b"")], enc)
    assert not inline_pack([blockdelta.Outgoing(b"\x08" * 32, b""), blockdelta.Outgoing(b"\x07" * 32, b"")], enc)


def test_a_second_holder_reusing_the_walk_adds_no_claim():
    from test_unchanged_snapshot import V, blocks_of, make, tree

    from kubegfs import merkle

    old = tree()
    merkle.digest(old, V)
    new = ns.replace(old, ("d", "leaf", "f001"), ns.File(77, 9, 0o644, (90,)), 9)
    merkle.digest(new, V)
    s = make(new, blocks_of(old))
    s.known["cs2"] = set(s.known["cs"])
    sent: list[str] = []

    async def call_cs(cs, method, path, **kw):  # type: ignore[no-untyped-def]
        sent.append(cs.id)
        return {}

    s.m.call_cs = call_cs  # type: ignore[attr-defined]
    enc, claimed = Encoded(), []

    async def both() -> None:
        for cid in ("cs", "cs2"):
            await s.ship_blocks(SimpleNamespace(id=cid), new, V, claimed, {}, enc)  # type: ignore[arg-type]

    asyncio.run(both())
    assert sent == ["cs", "cs2"] and claimed and len(claimed) == len(set(claimed))
    assert s.claimed == dict.fromkeys(claimed, 1)


def test_make_room_keeps_a_paths_newest_trees_but_one():
    def snap_tree(i):
        return ns.Dir(immutables.Map({"f": ns.File(i, 1, 0o644, ())}), 1)

    entries = {f"s{i}": {"id": f"s{i}", "path": "/p"} for i in range(3)}
    entries["q0"] = {"id": "q0", "path": "/q"}
    s = _snapshots(entries)
    trees = [snap_tree(i) for i in range(3)]
    other = snap_tree(9)
    s.remember_tree("/q", "q0", other)
    s.remember_tree("/p", "s0", trees[0])
    s.remember_tree("/p", "s1", trees[1])
    assert s.make_room("/p") == [trees[0]]  # (its next snapshot's tree makes two again)
    assert s.trees == {"q0": other, "s1": trees[1]}
    assert s.remember_tree("/p", "s2", trees[2]) == []  # nothing to let go on the way to the answer
    assert s.make_room("/nowhere") == []
