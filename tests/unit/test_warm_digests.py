"""The live trees of snapshotted paths are digested ahead of their next snapshot (in a worker
thread, soon after a change), so that snapshot's digest pass finds all but the last changes
memoised; what is memoised equals a digest from scratch."""

import asyncio
import gc
from types import SimpleNamespace

import immutables

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.master import snapshots
from kubegfs.master.snapshots import Snapshots, stale_trees, warm_job


def V(h):
    return h % 3 + 1


def tree(files=40):
    leaf = ns.Dir(immutables.Map({f"f{i:03d}": ns.File(i, 7, 0o644, (i + 1,)) for i in range(files)}), 5, 0o755)
    return ns.Dir(immutables.Map({"d": ns.Dir(immutables.Map({"leaf": leaf}), 5, 0o755),
                                  "other": ns.Dir(immutables.Map({"x": ns.File(1, 1, 0o644, ())}), 5, 0o755),
                                  "file": ns.File(1, 1, 0o644, ())}), 5, 0o755)


def fresh(d):
    """``d``'s digest from scratch (every directory a new node)."""
    def copy(x):
        if isinstance(x, ns.File):
            return x
        return ns.Dir(immutables.Map({k: copy(v) for k, v in x.children.items()}), x.mtime, x.mode)
    return merkle.digest(copy(d), V)


def changed(root, i):
    return ns.replace(root, ("d", "leaf", f"f{i:03d}"), ns.File(1000 + i, 9, 0o644, (500 + i,)), 9)


def test_stale_trees_names_each_undigested_live_directory_once():
    root = tree()
    assert stale_trees(root, ["/d", "/d/", "/other", "/file", "/missing"]) == [root.children["d"], root.children["other"]]
    merkle.digest(root.children["d"], V)
    assert stale_trees(root, ["/d", "/other"]) == [root.children["other"]]


def test_warm_job_digests_what_it_can_and_skips_a_tree_whose_chunk_is_gone():
    a, b = tree(), tree(30)

    seen = {"b": False}

    def version_of(h):
        if h == 5 and seen["b"]:  # (a file of b's d has chunk 5)
            raise KeyError(h)
        return V(h)

    assert warm_job([a.children["d"]], version_of) == 1
    assert a.children["d"].digest == fresh(a.children["d"])
    seen["b"] = True
    assert warm_job([b.children["d"], b.children["other"]], version_of) == 1
    assert b.children["d"].digest is None and b.children["other"].digest is not None


def make(root):
    m = SimpleNamespace(state=SimpleNamespace(root=root, version={h: V(h) for h in range(1, 2000)}, blocks={}))
    s = Snapshots(m)  # type: ignore[arg-type]
    s.latest["/d"] = ("s-1", root.children["d"])
    return s, m


def test_a_change_under_a_snapshotted_path_is_digested_soon_after(monkeypatch):
    monkeypatch.setattr(snapshots, "WARM_AFTER", 0.001)
    root = tree()
    merkle.digest(root, V)

    async def go():
        s, m = make(root)
        live = root
        for i in range(5):
            live = changed(live, i)
        m.state.root = live
        assert live.children["d"].digest is None
        s.changed()
        while s._warm_timer is not None or s._warming is not None:
            await asyncio.sleep(0.001)
        return live

    live = asyncio.run(go())
    assert live.children["d"].digest == fresh(live.children["d"])
    assert live.digest is None  # only the snapshotted paths' trees


def test_no_pass_while_a_build_runs_and_a_change_during_a_pass_gets_another(monkeypatch):
    monkeypatch.setattr(snapshots, "WARM_AFTER", 0.001)
    root = tree()

    async def go():
        s, m = make(root)
        build = asyncio.get_running_loop().create_future()
        s.builders["s-2"] = build  # type: ignore[assignment]
        s.changed()
        await asyncio.sleep(0.02)
        assert root.children["d"].digest is None and s._warm_timer is None  # the build digests it
        build.set_result(None)
        s.changed()  # (the build's commit is a change)
        while s._warming is None:
            await asyncio.sleep(0.001)
        m.state.root = changed(root, 1)  # while the pass runs
        s.changed()
        assert s._warm_timer is None  # not beside the running pass ...
        await s.warmed()
        while s._warm_timer is not None or s._warming is not None:  # ... but after it
            await asyncio.sleep(0.001)
        return m.state.root

    live = asyncio.run(go())
    assert root.children["d"].digest == fresh(root.children["d"])
    assert live.children["d"].digest == fresh(live.children["d"])


def test_no_pass_while_a_restore_pauses_the_collector(monkeypatch):
    monkeypatch.setattr(snapshots, "WARM_AFTER", 0.001)
    monkeypatch.setattr(snapshots, "GC_AFTER", 0.001)
    root = tree()

    async def go():
        s, _m = make(root)
        with s.quiet_gc():
            s.changed()
            await asyncio.sleep(0.02)
            assert s._warming is None and s._warm_timer is None
        await asyncio.sleep(0.01)  # (the collector back on)

    asyncio.run(go())
    assert gc.isenabled()
    assert root.children["d"].digest is None


def test_nothing_is_scheduled_without_a_snapshotted_path():
    async def go():
        s, _m = make(tree())
        s.latest.clear()
        s.changed()
        return s._warm_timer

    assert asyncio.run(go()) is None


def test_warmed_returns_once_a_pass_ends_even_a_failed_one():
    async def go():
        s, _m = make(tree())
        fut = asyncio.get_running_loop().create_future()
        s._warming = fut
        waiter = asyncio.ensure_future(s.warmed())
        await asyncio.sleep(0)
        assert not waiter.done()
        fut.set_exception(RuntimeError("boom"))
        await waiter

    asyncio.run(go())


def test_passes_under_a_stream_of_changes_take_at_most_their_share_of_a_core(monkeypatch):
    monkeypatch.setattr(snapshots, "WARM_AFTER", 0.001)
    root = tree()

    async def go():
        s, _m = make(root)
        s._warm_took = 0.03  # the last pass took 30 ms: the next waits 90 ms (WARM_SHARE 0.25)
        loop = asyncio.get_running_loop()
        s.changed()
        assert s._warm_timer is not None
        return s._warm_timer.when() - loop.time()

    delay = asyncio.run(go())
    assert 0.08 < delay <= 0.09 + 1e-3
