"""Incremental shipping never loses a block a snapshot needs: the master ships a snapshot's new
directory blocks (most of its blocks are the previous snapshot's), then the machine loses power
before the commit op is durable, and every chunkserver is killed too. After the restart the
previous snapshot's closure is whole on each of its holders, the interrupted one is built again
from the durable capture, and both restore byte-identically; deleting the older snapshot then
keeps every block the newer one shares with it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from test_deletion_gate import CHUNK, InProcessMaster

from kubegfs import merkle
from kubegfs.client import Client
from kubegfs.errors import KubegfsError
from kubegfs.local import LocalCluster
from kubegfs.master import precount, snapshots
from kubegfs.master.oplog import recover
from kubegfs_dev.util import bearer


def closure_missing(url: str, token: str, root_hex: str) -> list[str]:
    """The blocks of the tree named ``root_hex`` that the chunkserver at ``url`` cannot give
    (each block it gives is verified against its digest)."""
    level, seen, missing = [bytes.fromhex(root_hex)], set(), []
    while level:
        want = [d for d in dict.fromkeys(level) if d not in seen]
        seen.update(want)
        level = []
        for d in want:
            req = urllib.request.Request(f"{url}/internal/blocks/get", method="POST",
                                         data=json.dumps({"digests": [d.hex()]}).encode(),
                                         headers={**bearer(token), "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    got = dict(merkle.unpack_frames(resp.read()))
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                missing.append(d.hex())
                continue
            level += merkle.child_digests(got[d])
    return missing


def tree(c: Client, path: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for st in c.walk(path):
        rel = st["path"][len(path):]
        out[rel] = c.get(st["path"]) if st["type"] == "file" else None
    return out


def wait_state(c: Client, name: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = c.snapshot_show(name)["state"]
        if state != "pending" or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


@contextlib.contextmanager
def master_in_process(tmp_path: Path) -> Iterator[tuple[LocalCluster, InProcessMaster]]:
    """A cluster of 3 chunkservers whose master runs in this process (crashed at the end if it
    still runs), stopped at the end."""
    cl = LocalCluster(tmp_path, 3, chunk_size=CHUNK, heartbeat=0.1, dead_after=3.0)
    cl.start()
    try:
        cl.kill(cl.master, signal.SIGTERM)
        m = InProcessMaster(cl)
        try:
            cl.wait_registered(3)
            yield cl, m
        finally:
            if m.thread.is_alive():
                m.crash()
    finally:
        cl.stop()


def test_a_crash_between_ship_and_commit_loses_no_block(tmp_path):
    with master_in_process(tmp_path) as (cl, m):
        try:
            with Client(cl.master_url, cl.token) as c:
                c.mkdir("/t/big", parents=True)
                c.mkdir("/t/other")
                for i in range(200):  # one directory split into many sub-blocks
                    c.put(f"/t/big/f{i:03d}", f"v1-{i}".encode())
                c.put("/t/other/x", b"x")
                s1 = c.snapshot_create("/t", "s1", copies=2)
                assert s1["state"] == "ready"
                at_s1 = tree(c, "/t")
                c.put("/t/big/f007", b"changed")  # one leaf of /t/big and the path above it
                c.put("/t/big/f150-new", b"new")
                at_s2 = tree(c, "/t")
            m.sync.pause_after(1)  # the capture is durable; the commit after the shipping is not
            errors: list[BaseException] = []

            def create() -> None:
                with Client(cl.master_url, cl.token, timeout=60) as c2:
                    try:
                        c2.snapshot_create("/t", "s2", copies=2)
                    except (KubegfsError, OSError) as exc:
                        errors.append(exc)

            t = threading.Thread(target=create)
            t.start()
            assert m.sync.waiting.wait(30), "the commit never reached the log"
            claimed = m.call(lambda: dict(m.master.snapshots.claimed))
            assert claimed, "no block was shipped before the commit"
            # a holder restarts meanwhile: its full block report names the shipped blocks no
            # committed snapshot counts yet (garbage to a sweep that forgot the build in flight)
            cl.kill(cl.chunkservers[0], signal.SIGKILL)
            cl.start_chunkserver(cl.chunkservers[0])
            m.heartbeats_seen(3)
        finally:
            m.crash()
        t.join(60)
        assert not t.is_alive() and errors, "s2 was acknowledged though its commit never synced"
        for p in cl.chunkservers:  # and every chunkserver goes down hard too
            cl.kill(p, signal.SIGKILL)
        for p in cl.chunkservers:
            cl.start_chunkserver(p, wait=False)
        cl.start_master()
        cl.wait_registered(3)
        with cl.client() as c:
            s1 = c.snapshot_show("s1")
            assert wait_state(c, "s2") == "ready"  # built again from the durable capture
            s2 = c.snapshot_show("s2")
            assert s2["root"] != s1["root"] and s2["files"] == s1["files"] + 1
            for s in (s1, s2):
                for h in s["holders"]:
                    assert closure_missing(h["address"], cl.internal_token, s["root"]) == []
            r1 = c.snapshot_restore("s1", to="/r1")  # (not in this master's memory: read from a holder)
            assert tree(c, "/r1") == at_s1 and r1["blocks_fetched"] == r1["blocks_used"] > 0
            c.snapshot_restore("s2", to="/r2")
            assert tree(c, "/r2") == at_s2
            c.snapshot_delete("s1")  # its own blocks go; those s2 shares with it stay
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # a few heartbeats carry the deletions out
                time.sleep(0.5)
            for h in s2["holders"]:
                assert closure_missing(h["address"], cl.internal_token, s2["root"]) == []
            c.rm("/r2", recursive=True)
            c.snapshot_restore("s2", to="/r2")
            assert tree(c, "/r2") == at_s2


def test_the_commit_works_out_its_block_infos_while_the_blocks_ship(tmp_path, monkeypatch):
    """The commit op's rows (the new blocks' infos) and the since-previous diff are worked out
    once per build, off the loop, once the blocks went out to their holders: not on the way to
    the first request (beside the collect and the packing), nor on the loop at the commit."""
    with master_in_process(tmp_path) as (cl, m):
        posted = threading.Event()
        real_call = m.master.call_cs

        async def call_cs(cs, method, path, **kw):  # type: ignore[no-untyped-def]
            if path == "/internal/blocks/delta":
                posted.set()
            return await real_call(cs, method, path, **kw)

        m.master.call_cs = call_cs  # type: ignore[method-assign]
        loop_thread = m.thread
        seen: list[tuple[bool, bool]] = []
        real_infos = merkle.new_block_infos

        def infos(*a):  # type: ignore[no-untyped-def]
            seen.append((threading.current_thread() is loop_thread, posted.is_set()))
            return real_infos(*a)

        monkeypatch.setattr(merkle, "new_block_infos", infos)
        walks: list[int] = []
        real_outgoing = snapshots.outgoing
        monkeypatch.setattr(snapshots, "outgoing", lambda *a, **k: walks.append(1) or real_outgoing(*a, **k))
        diffs_after_walk: list[int] = []  # the since-previous diff starts once the blocks are collected
        real_since = m.master.snapshots.since_previous

        since_after_post: list[bool] = []

        async def since_previous(*a):  # type: ignore[no-untyped-def]
            diffs_after_walk.append(len(walks))
            since_after_post.append(posted.is_set())
            return await real_since(*a)

        m.master.snapshots.since_previous = since_previous  # type: ignore[method-assign]
        rows_on_loop: list[bool] = []  # the op's rows of them too
        real_rows = snapshots.encode_block_infos_z
        monkeypatch.setattr(snapshots, "encode_block_infos_z",
                            lambda i: rows_on_loop.append(threading.current_thread() is loop_thread) or real_rows(i))
        with Client(cl.master_url, cl.token) as c:
            c.mkdir("/t/big", parents=True)
            for i in range(40):
                c.put(f"/t/big/f{i:03d}", f"v1-{i}".encode())
            assert c.snapshot_create("/t", "s1", copies=2)["state"] == "ready"
            assert seen == [(False, True)]
            w1 = len(walks)
            c.put("/t/big/f007", b"changed")
            posted.clear()
            s2 = c.snapshot_create("/t", "s2", copies=2)
            assert s2["state"] == "ready" and s2["shipped_bytes"] > 0
            assert seen[1:] == [(False, True)]
            # a walk per holder at most: the second holder takes the first one's unless what it
            # is known to hold differs from the first's at that moment (a heartbeat in between)
            w2 = len(walks) - w1
            assert 1 <= w1 <= 2 and 1 <= w2 <= 2
            assert rows_on_loop == [False, False]
            assert diffs_after_walk == [w1, w1 + w2]  # each build's diff after its walks
            assert since_after_post == [True, True]


def test_precounted_commits_replay_to_the_same_counts(tmp_path, monkeypatch):
    """Commits whose chunk references were counted in slices before they were logged (every
    one here, in slices of one block, with writes going on) leave the state a replay of the
    log gives: the same chunk references and block counts."""
    monkeypatch.setattr(precount, "PRECOUNT_MIN", 1)
    monkeypatch.setattr(precount, "PRECOUNT_SLICE", 1)
    took: list[bool] = []
    real = precount.precount

    async def counted(*a, **kw):  # type: ignore[no-untyped-def]
        took.append(await real(*a, **kw))
        return took[-1]

    monkeypatch.setattr(precount, "precount", counted)
    with master_in_process(tmp_path) as (cl, m):
        with Client(cl.master_url, cl.token) as c:
            for d in range(4):
                c.mkdir(f"/t/d{d}", parents=True)
                for i in range(30):
                    c.put(f"/t/d{d}/f{i:02d}", f"{d}-{i}".encode())
            assert c.snapshot_create("/t", "s1", copies=2)["state"] == "ready"
            c.put("/t/d2/f07", b"changed")
            c.rm("/t/d3", recursive=True)
            stop = threading.Event()

            def writes() -> None:
                with Client(cl.master_url, cl.token) as w:
                    i = 0
                    while not stop.is_set():
                        w.put(f"/t/d1/w{i}", b"w")
                        i += 1

            t = threading.Thread(target=writes)
            t.start()
            try:
                for n in range(2, 5):
                    assert c.snapshot_create("/t", f"s{n}", copies=2)["state"] == "ready"
            finally:
                stop.set()
                t.join(30)
            c.snapshot_delete("s1")
        assert took and all(took)

        def counts() -> tuple[dict[int, int], dict[bytes, tuple[int, object]]]:
            st = m.master.state
            return dict(st.snap), {d: (b.refs, b.info) for d, b in st.blocks.items()}

        live = m.call(counts)
        replayed, _rep = recover(cl.master.data, CHUNK, cl.replication)
        assert live == (replayed.snap, {d: (b.refs, b.info) for d, b in replayed.blocks.items()})
