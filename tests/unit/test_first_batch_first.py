"""A holder's blocks ship batch by batch: its first batch is packed as soon as its blocks are
collected, and the infos job (the commit's rows, needed only after the last batch) starts once
the holders' first requests are out (the build's ``Encoded.sending``); a small change's one
batch is packed on the loop; holders that reuse a walk reuse its batches and their packing."""

import asyncio
from types import SimpleNamespace

import immutables
from test_unchanged_snapshot import V, make

from kubegfs import merkle
from kubegfs import namespace as ns
from kubegfs.master import snapshots
from kubegfs.master.snapshots import Encoded


def big_tree(dirs=6, files=300):
    return ns.Dir(immutables.Map({f"d{d}": ns.Dir(immutables.Map({f"f{i:04d}": ns.File(i, 7, 0o644, (d * files + i + 1,))
                                                                  for i in range(files)}), 5, 0o755)
                                  for d in range(dirs)}), 5, 0o755)


def ship_to_two(root, monkeypatch, batch):
    """Ship ``root``'s blocks to holders ``a`` and ``b``; returns each worker job's function
    name with whether a batch was packed when it was started, the bodies each holder got, and
    the build's Encoded."""
    monkeypatch.setattr(snapshots, "BLOCK_BATCH", batch)
    merkle.digest(root, V)
    s = make(root, [])
    s.m.state.version = {h: V(h) for h in range(1, 2000)}
    s.claimed = {}
    bodies: dict[str, list[bytes]] = {"a": [], "b": []}

    async def call_cs(cs, method, path, data=b"", **kw):
        bodies[cs.id].append(data)
        return {}

    s.m.call_cs = call_cs
    enc = Encoded()
    jobs: list[tuple[str, bool]] = []

    def sending():  # (the build starts the infos job once every holder's first request is out)
        if enc.start_infos is not None:
            enc.start_infos()

    enc.sending = sending

    async def ship():
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor
        packed: list[asyncio.Future] = []

        def counted(ex, fn, *args):
            jobs.append((getattr(fn, "__name__", ""), any(f.done() for f in packed)))
            fut = real(ex, fn, *args)
            if fn is snapshots.pack_job:
                packed.append(fut)
            return fut

        loop.run_in_executor = counted  # type: ignore[method-assign]
        try:
            got = await asyncio.gather(*(s.ship_blocks(SimpleNamespace(id=h), root, V, [], {}, enc) for h in "ab"))
            if enc.infos_job is not None:
                await enc.infos_job
            return got
        finally:
            del loop.run_in_executor

    asyncio.run(ship())
    assert enc.infos is not None and set(enc.infos[1]) == set(merkle.new_block_infos(root, V, lambda _d: False))
    return jobs, bodies, enc


def test_the_first_batch_is_packed_before_the_infos_job_starts_and_holders_share_the_batches(monkeypatch):
    jobs, bodies, enc = ship_to_two(big_tree(), monkeypatch, 2048)  # many batches
    names = [n for n, _ in jobs]
    assert names[:2] == ["collect", "pack_job"]  # the first batch packed right after the collect
    assert names.count("infos") == 1 and dict(jobs)["infos"]  # the infos job only once a batch is packed
    assert names.count("collect") == 1  # the second holder reuses the walk ...
    assert enc.batched is not None and names.count("pack_job") == len(enc.batched[1]) > 3  # ... its batches and their packing
    assert bodies["a"] == bodies["b"] and len(bodies["a"]) == len(enc.batched[1])


def test_one_small_batch_is_packed_on_the_loop_before_the_infos_job_starts(monkeypatch):
    jobs, bodies, enc = ship_to_two(big_tree(dirs=2, files=40), monkeypatch, 4 << 20)
    assert enc.batched is not None and len(enc.batched[1]) == 1 and len(bodies["a"]) == 1
    assert [n for n, _ in jobs] == ["collect", "infos"]  # no worker's pack job: packed on the loop
