"""A snapshot of a tree whose blocks a holder and the catalog already have (an unchanged tree)
is built on the event loop: no worker job for its digest, its blocks, their infos or what
changed since the previous snapshot; a tree that did change still gets them."""

import asyncio
from types import SimpleNamespace

import immutables

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.master.snapshots import Encoded, Snapshots
from kubegfs.master.state import decode_block_infos


def V(h):
    return h % 3 + 1


def tree(files=40):
    leaf = ns.Dir(immutables.Map({f"f{i:03d}": ns.File(i, 7, 0o644, (i + 1,)) for i in range(files)}), 5, 0o755)
    return ns.Dir(immutables.Map({"d": ns.Dir(immutables.Map({"leaf": leaf}), 5, 0o755),
                                  "file": ns.File(1, 1, 0o644, ())}), 5, 0o755)


def blocks_of(root):
    return merkle.new_block_infos(root, V, lambda _d: False)


def make(root, held):
    """A Snapshots whose one holder ``cs`` holds (and the catalog counts) the blocks ``held``."""
    counted = dict.fromkeys(held, 1)
    m = SimpleNamespace(opts=SimpleNamespace(dead_after=1.0),
                        state=SimpleNamespace(root=root, blocks=counted, blocks_gen=3,
                                              precount_blocks=lambda _i: None, unprecount_blocks=lambda _i: None,
                                              plan_blocks=lambda *_a: None,
                                              version={h: V(h) for h in range(1, 100)},
                                              snapshots={"s-1": {"id": "s-1", "name": "a", "state": "ready"}}))
    s = Snapshots(m)  # type: ignore[arg-type]
    s.known["cs"] = set(held)
    return s


class Jobs:
    """Counts the worker jobs a coroutine starts (and runs them)."""

    def __init__(self):
        self.n = 0

    async def run(self, coro):
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor

        def counted(ex, fn, *args):
            self.n += 1
            return real(ex, fn, *args)

        loop.run_in_executor = counted  # type: ignore[method-assign]
        try:
            return await coro
        finally:
            del loop.run_in_executor


def test_an_unchanged_tree_ships_no_block_and_starts_no_worker_job():
    root = tree()
    merkle.digest(root, V)
    s = make(root, blocks_of(root))
    enc, claimed, jobs = Encoded(), [], Jobs()
    sent, carried = asyncio.run(jobs.run(s.ship_blocks(SimpleNamespace(id="cs"), root, V, claimed, {}, enc)))
    assert (sent, carried, claimed, jobs.n) == (0, False, [], 0)
    assert enc.infos is not None and enc.infos[:2] == (3, {}) and enc.infos_job is None  # nothing new for the commit to count
    assert decode_block_infos(enc.infos[2]) == {}

    prev = tree()  # the previous snapshot's tree: another node, the same content
    merkle.digest(prev, V)
    s.latest["/p"] = ("s-1", prev)
    entry = {"id": "s-2", "path": "/p"}
    jobs = Jobs()
    dg, changes = asyncio.run(jobs.run(s.since_previous(entry, root)))  # type: ignore[arg-type]
    assert jobs.n == 0 and dg == root.digest.hex()
    assert changes["since"] == "a" and changes["created"] == changes["deleted"] == changes["modified"] == 0


def test_a_changed_tree_still_gets_its_blocks_infos_and_diff_from_workers():
    old = tree()
    merkle.digest(old, V)
    new = ns.replace(old, ("d", "leaf", "f001"), ns.File(77, 9, 0o644, (90,)), 9)
    s = make(new, blocks_of(old))
    enc, claimed, jobs = Encoded(), [], Jobs()
    calls = []

    async def call_cs(cs, method, path, **kw):
        calls.append((method, path))
        return {}

    s.m.call_cs = call_cs
    s.claimed = {}
    sending = []
    enc.sending = lambda: sending.append(list(calls))

    async def ship_then_infos():
        await s.ship_blocks(SimpleNamespace(id="cs"), new, V, claimed, {}, enc)
        assert enc.infos_job is None and enc.start_infos is not None  # left for the build to start
        enc.start_infos()
        await enc.infos_job

    asyncio.run(jobs.run(ship_then_infos()))
    new_blocks = set(blocks_of(new)) - set(blocks_of(old))
    assert new_blocks and set(claimed) >= new_blocks and calls == [("POST", "/internal/blocks/delta")]
    assert sending == [[]]  # called once, as its first request goes
    assert jobs.n == 2  # the collect and the infos (the one small batch is packed on the loop)
    assert enc.infos is not None and set(enc.infos[1]) == new_blocks
    s.latest["/p"] = ("s-1", old)
    jobs = Jobs()
    _dg, changes = asyncio.run(jobs.run(s.since_previous({"id": "s-2", "path": "/p"}, new)))  # type: ignore[arg-type]
    assert jobs.n == 1 and changes["modified"] >= 1 and changes["created"] == 0  # (the digest is memoised: only the diff)
