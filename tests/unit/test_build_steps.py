"""What a snapshot build answers: pending until its commit is durable, and nothing after the
operation log failed."""

import asyncio
from types import SimpleNamespace

import pytest

from kubegfs.errors import Unavailable
from kubegfs.master.snapshots import Snapshots


def test_a_commit_applied_but_not_durable_is_answered_pending_and_a_failed_log_not_at_all():
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
