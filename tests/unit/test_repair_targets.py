"""Re-replication's choice of targets around deletes, on a master without a server: the
chunkservers are heartbeat bodies and the copy order a recorded call."""

import asyncio
import time

from kubegfs.auth import Tokens
from kubegfs.master import server
from kubegfs.topology import Location


def test_no_copy_goes_to_a_server_until_it_has_carried_out_its_delete_of_that_chunk(tmp_path):
    async def scenario() -> None:
        m = server.Master(tmp_path, Tokens("t" * 32, "i" * 32, "m" * 32), Location("n", "z", "r", "127.0.0.1"),
                          1 << 20, 3)
        try:
            m.guard.safemode.leave("test", time.monotonic())
            h = m.state.new_handle()
            m.state.apply({"op": "commit", "path": "/f", "size": 10, "chunks": [h], "new": [[h, 1]],
                           "mode": 0o644, "mtime": 1, "seq": m.oplog.next_seq - 1})
            copies: list[tuple[str, str]] = []

            async def call_cs(cs, method, path, **_kw):
                copies.append((cs.id, path))
                return {}

            m.call_cs = call_cs  # type: ignore[method-assign]

            async def beat(cid: str, zone: str, **body):
                full = "chunks" in body
                cs = m.chunkmap.heard_from(cid, f"http://{cid}", Location(cid, zone, "r"), full)
                assert cs is not None
                return cs, await m.heartbeat(cs, {"id": cid, **body}, full)

            await beat("a", "za", chunks=[[f"{h:016x}", 1]])
            await beat("b", "zb", chunks=[[f"{h:016x}", 1]])
            c, _ = await beat("c", "zc", chunks=[])
            c.stale.add(h)  # e.g. it missed the chunk's last piece: its copy is to go
            _, reply = await beat("c", "zc", added=[[f"{h:016x}", 1]])
            assert reply["delete_chunks"] == [f"{h:016x}"]
            assert m.chunkmap.deleting(h) == {"c"}
            await m.repair.once()
            assert copies == [] and m.chunkmap.dirty  # the delete could land after a copy
            await beat("c", "zc", removed=[f"{h:016x}"])  # it deleted the copy, then beat again
            assert m.chunkmap.deleting(h) == set()
            await m.repair.once()
            assert copies == [("c", f"/internal/chunks/{h:016x}/replicate")]
            assert m.chunkmap.locations[h] == {"a", "b", "c"}
        finally:
            m.oplog.close()

    asyncio.run(scenario())
