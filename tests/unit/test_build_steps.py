"""Steps of a snapshot build around shipping: the commit's jobs (block infos, the since-previous
diff) start once every holder's blocks are collected, and the trees a new one displaces are
freed after the build's reply, not before it."""

import asyncio
import sys
from types import SimpleNamespace

import immutables

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.master import snapshots
from kubegfs.master.snapshots import Encoded, Snapshots


def V(h):
    return 1


def tree():
    leaf = ns.Dir(immutables.Map({f"f{i:03d}": ns.File(i, 7, 0o644, (i + 1,)) for i in range(40)}), 5, 0o755)
    return ns.Dir(immutables.Map({"a": leaf, "b": ns.Dir(immutables.Map(), 5, 0o755)}), 5, 0o755)


def test_the_commits_jobs_start_once_every_holders_blocks_are_collected():
    node = tree()
    merkle.digest(node, V)
    seen = []

    async def go():
        enc = Encoded()
        calls = []

        async def call_cs(cs, method, path, **kw):
            seen.append((cs.id, enc.infos_job is not None, len(calls)))
            calls.append(cs.id)
            await asyncio.sleep(0.01)
            return {"stored": 1, "new": 1}

        m = SimpleNamespace(state=SimpleNamespace(blocks={}, blocks_gen=0), call_cs=call_cs,
                            opts=SimpleNamespace(dead_after=1.0))
        s = Snapshots(m)  # type: ignore[arg-type]
        enc.collected = lambda: seen.append(("collected", enc.infos_job is not None, len(calls)))
        enc.expect = 2
        holders = [SimpleNamespace(id="cs-1"), SimpleNamespace(id="cs-2")]
        await asyncio.gather(*(s.ship_blocks(cs, node, V, [], {}, enc) for cs in holders))
        await enc.infos_job
        assert enc.infos is not None and enc.infos[1] and calls == ["cs-1", "cs-2"]

    asyncio.run(go())
    first, collected, second = seen[0], seen[1], seen[2]
    assert first[:2] == ("cs-1", False)  # the first holder's request went out before the jobs
    assert collected == ("collected", True, 1) and second[:2] == ("cs-2", True)


def test_trees_let_go_are_freed_after_the_reply(monkeypatch):
    monkeypatch.setattr(snapshots, "GC_AFTER", 0.01)
    old = tree()

    async def go():
        entries = {f"s{i}": {"path": "/d"} for i in range(4)}
        s = Snapshots(SimpleNamespace(state=SimpleNamespace(snapshots=entries)))  # type: ignore[arg-type]
        s.remember_tree("/d", "s0", old)
        s.remember_tree("/d", "s1", tree())
        held = sys.getrefcount(old)
        s.remember_tree("/d", "s2", tree())
        assert "s0" not in s.trees and sorted(s.trees) == ["s1", "s2"]
        assert sys.getrefcount(old) == held  # still referenced until the loop gets to it
        await asyncio.sleep(0.03)
        assert sys.getrefcount(old) == held - 1

    asyncio.run(go())


def test_a_commit_applied_but_not_durable_is_answered_pending_and_a_failed_log_not_at_all():
    import pytest

    from kubegfs.errors import Unavailable

    entry = {"id": "s-1", "name": "a", "path": "/d", "state": "ready", "holders": [], "handles_z": b""}

    async def go():
        m = SimpleNamespace(chunkmap=SimpleNamespace(cs={}), oplog=SimpleNamespace(failed=None))
        s = Snapshots(m)  # type: ignore[arg-type]
        build = asyncio.get_running_loop().create_future()
        s.builders["s-1"] = build  # type: ignore[assignment]
        assert s.snap_json(entry)["state"] == "pending"  # its commit waits for the log
        await s.wait_built("s-1", 0.01)
        build.set_result(None)
        assert s.snap_json(entry)["state"] == "ready"
        m.oplog.failed = OSError("power lost")
        with pytest.raises(Unavailable):
            await s.wait_built("s-1", 0.01)

    asyncio.run(go())
