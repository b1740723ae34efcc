"""Heartbeat reconciliation and liveness without a server."""

from kubegfs.master.chunkmap import ChunkMap
from kubegfs.master.leases import LeaseTable
from kubegfs.master.state import MasterState
from kubegfs.topology import Location


def setup():
    st = MasterState(1 << 20, 3)
    st.apply({"op": "incarnation", "n": 1, "seq": 1})
    h = st.new_handle()
    st.apply({"op": "commit", "path": "/f", "size": 10, "chunks": [h], "new": [[h, 1]], "mode": 0o644,
              "mtime": 1, "seq": 2})
    st.apply({"op": "bump", "h": h, "v": 3, "seq": 3})
    leases = LeaseTable()
    dead = []
    return st, h, leases, ChunkMap(st, leases, on_dead=dead.append), dead


def register(cm, cid, chunks, address=None):
    cs = cm.heard_from(cid, address or f"http://{cid}", Location(cid), full=True)
    return cs, cm.reconcile(cs, {"chunks": [[f"{h:016x}", v] for h, v in chunks]}, full=True)


def test_a_full_report_lists_good_replicas_and_returns_the_rest_for_deletion():
    st, h, leases, cm, _ = setup()
    assert cm.heard_from("a", "http://a", Location("a"), full=False) is None  # must register first
    _, delete = register(cm, "a", [(h, 3)])
    assert delete == set() and cm.locations[h] == {"a"}
    _, delete = register(cm, "b", [(h, 2), (0x99, 1)])  # an older version and an unknown handle
    assert delete == {h, 0x99} and cm.locations[h] == {"a"}
    assert cm.holding(h) == {"a"}  # b's copy is ordered deleted: no longer counts as held
    lease = leases.grant("/g", "create", 0o644, None)
    lease.allocated[0x77] = ["c"]
    _, delete = register(cm, "c", [(0x77, 1)])  # a chunk being written is not garbage
    assert delete == set()


def test_corrupt_and_stale_copies_and_garbage():
    st, h, _leases, cm, _ = setup()
    a, _ = register(cm, "a", [(h, 3)])
    assert cm.reconcile(a, {"corrupt": [f"{h:016x}"]}, full=False) == {h}
    assert cm.locations[h] == set() and cm.dirty
    b, _ = register(cm, "b", [(h, 3)])
    b.stale.add(h)
    cm.locations[h].discard("b")
    assert cm.reconcile(b, {}, full=False) == {h} and not b.stale
    c, _ = register(cm, "c", [(h, 3)])
    st.apply({"op": "rm", "path": "/f", "mtime": 2, "seq": 4})
    assert h in st.garbage
    assert cm.reconcile(c, {}, full=False) == {h}
    assert h not in st.garbage  # no other server holds it: nothing left to collect


def test_silent_servers_die_and_a_new_identity_at_an_address_replaces_the_old():
    _st, h, _leases, cm, dead = setup()
    a, _ = register(cm, "a", [(h, 3)])
    b, _ = register(cm, "b", [(h, 3)])
    b.last_seen -= 10
    assert cm.expire(5.0) == [b] and dead == [b] and cm.locations[h] == {"a"}
    assert [c.id for c in cm.alive()] == ["a"] and [c.id for c in cm.replicas_of(h)] == ["a"]
    register(cm, "a2", [], address="http://a")  # a fresh disk behind the same address
    assert not a.alive and cm.locations[h] == set()
    under, lost, _todo = cm.scan_replication()
    assert (under, lost) == (1, 1) and cm.under_replicated_count() == 1


def test_a_sliced_scan_gives_the_event_loop_turns_and_the_same_answer(monkeypatch):
    import asyncio

    from kubegfs.master import chunkmap

    monkeypatch.setattr(chunkmap, "SCAN_SLICE", 3)
    st, h, _leases, cm, _ = setup()

    def commit(path):
        n = st.new_handle()
        st.apply({"op": "commit", "path": path, "size": 10, "chunks": [n], "new": [[n, 1]], "mode": 0o644,
                  "mtime": 1, "seq": st.seq + 1})
        return n

    made = [commit(f"/g{i}") for i in range(10)]
    register(cm, "a", [(h, 3), (made[0], 1)])
    want = cm.scan_replication(limit=5)
    assert want[:2] == (11, 9)
    cm._lost_reported.clear()
    turns = []

    async def meanwhile():
        while True:
            turns.append(len(st.version))
            if len(turns) == 2:
                commit("/late")  # the chunk table changes in the middle of the pass
            await asyncio.sleep(0)

    async def scenario():
        other = asyncio.create_task(meanwhile())
        await asyncio.sleep(0)
        got = await cm.scan_replication_sliced(limit=5)
        other.cancel()
        return got

    assert asyncio.run(scenario()) == want  # the late chunk waits for the next pass
    assert len(turns) >= 4  # 11 chunks in slices of 3: the loop ran between them
    assert cm.scan_replication(limit=5)[:2] == (12, 10)


def test_a_counted_replica_reported_removed_marks_the_map_dirty():
    """A replica that went away (its server deleted it) leaves the chunk short: re-replication
    must run again, or the chunk stays under-replicated until something else happens."""
    _st, h, _leases, cm, _ = setup()
    a, _ = register(cm, "a", [(h, 3)])
    cm.dirty = False
    cm.reconcile(a, {"removed": [f"{h:016x}"]}, full=False)
    assert cm.locations[h] == set() and h not in a.chunks and cm.dirty
    cm.dirty = False
    cm.reconcile(a, {"removed": [f"{0x55:016x}"]}, full=False)  # never a replica: nothing to repair
    assert not cm.dirty

