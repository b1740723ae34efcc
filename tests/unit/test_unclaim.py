"""A finished build's block claims are dropped in slices, the event loop turning between them."""

import asyncio

from kubegfs.master import snapshots
from kubegfs.master.snapshots import Snapshots


def test_a_big_builds_claims_go_in_slices_and_keep_the_others(monkeypatch):
    monkeypatch.setattr(snapshots, "UNCLAIM_SLICE", 3)
    s = Snapshots.__new__(Snapshots)
    mine = [bytes([i]) for i in range(10)]
    s.claimed = {d: 1 for d in mine}
    s.claimed[b"\x01"] = 2  # another build claimed it too
    seen: list[int] = []

    async def go() -> None:
        task = asyncio.ensure_future(s.unclaim_slices(mine))
        while not task.done():
            seen.append(len(s.claimed))
            await asyncio.sleep(0)

    asyncio.run(go())
    assert s.claimed == {b"\x01": 1}
    assert seen[:4] == [10, 8, 5, 2]  # three claims a turn (the shared one stays)
