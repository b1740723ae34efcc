"""Nothing leaves the master before the op that caused it is durable (see master/outbox.py).

The master runs in this process with its op log's sync held on an event: an op is applied in
memory but not durable. Chunkservers (real processes) heartbeat meanwhile. Then the master
"crashes" like a machine losing power: the log is cut back to what was synced, and a real master
process recovers from it. The op is gone (it was never acknowledged), so everything it freed must
still be on the chunkservers.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from kubegfs.auth import Tokens
from kubegfs.client import Client
from kubegfs.errors import KubegfsError
from kubegfs.formats import scan_log
from kubegfs.local import LocalCluster
from kubegfs.master.server import Master, Options
from kubegfs.topology import Location
from kubegfs_dev.util import block_copies, stored_record

CHUNK = 64 * 1024


def _records(seg: Path) -> int:
    """How much of a log segment is records (zeros written ahead follow them, ``oplog``)."""
    return scan_log(seg.read_bytes(), padded=True).good_bytes


class PausableSync:
    """The op log's sync seam: ``pause()`` holds every sync until ``crash()``, which makes the
    held and later syncs fail and cuts each log file back to its last synced length."""

    def __init__(self, log_dir: Path) -> None:
        self.dir = log_dir
        self.open = threading.Event()
        self.open.set()
        self.crashed = False
        self.synced: dict[str, int] = {p.name: _records(p) for p in log_dir.glob("log-*.wal")}
        self.waiting = threading.Event()
        self.after: int | None = None

    def __call__(self, fd: int) -> None:
        if self.after is not None:
            self.after -= 1
            if self.after < 0:
                self.after = None
                self.pause()
        if not self.open.is_set():
            self.waiting.set()
        self.open.wait()
        if self.crashed:
            raise OSError("power lost")
        os.fdatasync(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        self.synced[path.name] = _records(path)

    def pause(self) -> None:
        self.waiting.clear()
        self.open.clear()

    def pause_after(self, n: int) -> None:
        """Let ``n`` more syncs through, then hold the next ones (as ``pause``)."""
        self.waiting.clear()
        self.after = n

    def crash(self) -> None:
        self.crashed = True
        self.open.set()

    def cut_logs(self) -> None:
        for p in self.dir.glob("log-*.wal"):
            keep = self.synced.get(p.name, 0)
            if p.stat().st_size > keep:
                os.truncate(p, keep)


class InProcessMaster:
    def __init__(self, cl: LocalCluster) -> None:
        self.cl = cl
        m = cl.master
        m.data.mkdir(parents=True, exist_ok=True)
        self.sync = PausableSync(m.data)
        self.loop = asyncio.new_event_loop()
        self.master = Master(m.data, Tokens(cl.token, cl.internal_token, cl.metrics_token), Location(m.node, m.zone, m.region, m.host), cl.chunk_size,
                             cl.replication, Options(dead_after=cl.dead_after, sync=self.sync))
        self.runner = web.AppRunner(self.master.app(), handle_signals=False, access_log=None)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.thread.start()
        assert self.ready.wait(30), "the in-process master did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, self.cl.master.host, self.cl.master.port).start())
        self.ready.set()
        self.loop.run_forever()

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the master's loop (its state is not thread-safe)."""
        async def go() -> object:
            return fn()
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def heartbeats_seen(self, rounds: int = 3) -> None:
        """Wait until every registered chunkserver has heartbeated ``rounds`` more times."""
        for _ in range(rounds):
            before = self.call(lambda: {c.id: c.last_seen for c in self.master.chunkmap.alive()})
            assert isinstance(before, dict) and before
            deadline = time.monotonic() + 10
            while True:
                now = self.call(lambda: {c.id: c.last_seen for c in self.master.chunkmap.cs.values()})
                assert isinstance(now, dict)
                if all(now[i] > t for i, t in before.items()):
                    break
                assert time.monotonic() < deadline, "chunkservers stopped heartbeating"
                time.sleep(0.05)

    def crash(self) -> None:
        """Power loss: nothing more reaches the disk, the process is gone, unsynced log bytes too."""
        self.sync.crash()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.sync.cut_logs()
        # the process is gone, and a new one starts with its cyclic collector on: a snapshot
        # build or restore cut off by the crash leaves it paused (QuietGC) in this test process
        gc.enable()


@pytest.fixture(scope="module")
def gate_cluster(tmp_path_factory):
    cl = LocalCluster(tmp_path_factory.mktemp("gate"), 3, chunk_size=CHUNK, heartbeat=0.1, dead_after=3.0)
    cl.start()
    yield cl
    cl.stop()


def chunk_files(cl: LocalCluster, handles: list[str]) -> int:
    return sum((p.data / "chunks" / h[-2:] / f"{h}.chk").exists() for p in cl.chunkservers for h in handles)


def record_files(cl: LocalCluster, sid: str) -> int:
    return sum(stored_record(p.data, sid) is not None for p in cl.chunkservers)


def unacknowledged(cl: LocalCluster, setup: Callable[[Client], object], op: Callable[[Client], object]) -> Client:
    """Run ``setup`` durably, then ``op`` with the log held, let heartbeats flow, crash the master
    and recover it from the log. Returns a client of the recovered master."""
    cl.kill(cl.master, signal.SIGTERM)
    m = InProcessMaster(cl)
    try:
        cl.wait_registered(len(cl.chunkservers))
        with Client(cl.master_url, cl.token) as c:
            setup(c)
        m.sync.pause()
        errors: list[BaseException] = []

        def run() -> None:
            with Client(cl.master_url, cl.token, timeout=30) as c2:
                try:
                    op(c2)
                except (KubegfsError, OSError) as exc:
                    errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        assert m.sync.waiting.wait(10), "the op never reached the log"
        m.heartbeats_seen(3)  # each chunkserver was answered after the op was applied
    finally:
        m.crash()
    t.join(30)
    assert not t.is_alive() and errors, "the op was acknowledged though its log record never synced"
    cl.start_master()
    cl.wait_registered(len(cl.chunkservers))
    return cl.client()


def _body(n: int = 2 * CHUNK + 5) -> bytes:
    return random.randbytes(n)


# (mv never frees a chunk: it refuses an existing destination, see test_namespace_state)
CASES = ["rm", "rm -r", "overwrite", "snapshot delete", "restore in place"]


@pytest.mark.parametrize("case", CASES)
def test_unlogged_op_deletes_nothing(gate_cluster, case):
    cl = gate_cluster
    d = f"/{case.replace(' ', '-')}-{random.randrange(1 << 30)}"
    a, b = _body(), _body()
    seen: dict[str, object] = {}

    def setup(c: Client) -> None:
        c.mkdir(d)
        c.put(f"{d}/f", a)
        c.mkdir(f"{d}/sub")
        c.put(f"{d}/sub/g", b)
        seen["handles"] = [x["handle"] for p in (f"{d}/f", f"{d}/sub/g") for x in c.layout(p)["chunks"]]
        if case in ("snapshot delete", "restore in place"):
            s = c.snapshot_create(d, f"s{d[1:]}"[:60].replace(" ", "-"), copies=2)
            seen["snap"] = s
            if case == "snapshot delete":
                c.rm(f"{d}/f")  # the snapshot alone holds those chunks now
            else:
                c.put(f"{d}/f", b)  # the live file differs from the snapshot's
                seen["handles"] = [x["handle"] for x in c.layout(f"{d}/f")["chunks"]]

    def op(c: Client) -> None:
        if case == "rm":
            c.rm(f"{d}/f")
        elif case == "rm -r":
            c.rm(d, recursive=True)
        elif case == "overwrite":
            c.put(f"{d}/f", b"new bytes")
        elif case == "snapshot delete":
            c.snapshot_delete(seen["snap"]["name"])  # type: ignore[index]
        else:
            c.snapshot_restore(seen["snap"]["name"])  # type: ignore[index]

    c = unacknowledged(cl, setup, op)
    handles = seen["handles"]
    assert isinstance(handles, list)
    # every replica of every chunk the lost op had freed is still on disk
    assert chunk_files(cl, handles) == 3 * len(handles)
    if case == "snapshot delete":
        s = c.snapshot_show(seen["snap"]["name"])  # type: ignore[index]
        assert s["state"] == "ready" and record_files(cl, s["id"]) == 2
        assert s["format"] == 3 and block_copies([p.url for p in cl.chunkservers], cl.internal_token, s["root"]) == 2  # its blocks were kept too
        c.snapshot_restore(s["name"], to=f"{d}-copy")
        assert c.get(f"{d}-copy/f") == a and c.get(f"{d}-copy/sub/g") == b
    elif case == "restore in place":
        assert c.get(f"{d}/f") == b
    else:
        assert c.get(f"{d}/f") == a and c.get(f"{d}/sub/g") == b
    # once an op is durable its garbage does go
    c.rm(d, recursive=True)
    if case == "snapshot delete":
        c.rm(f"{d}-copy", recursive=True)
    if "snap" in seen:
        c.snapshot_delete(seen["snap"]["name"])  # type: ignore[index]
    deadline = time.monotonic() + 20
    while chunk_files(cl, handles) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chunk_files(cl, handles) == 0
    if "snap" in seen:  # and the blocks no snapshot reaches any more
        root = seen["snap"]["root"]  # type: ignore[index]
        while block_copies([p.url for p in cl.chunkservers], cl.internal_token, root) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert block_copies([p.url for p in cl.chunkservers], cl.internal_token, root) == 0
    c.close()


def test_unlogged_version_bump_retires_no_replica(gate_cluster):
    """A version bump that reached two replicas but not the log: the third replica, now behind the
    master's in-memory version, is not deleted; after recovery all three count."""
    cl = gate_cluster
    path = f"/bump-{random.randrange(1 << 30)}"
    cl.kill(cl.master, signal.SIGTERM)
    m = InProcessMaster(cl)
    try:
        cl.wait_registered(3)
        with Client(cl.master_url, cl.token) as c:
            c.put(path, _body(CHUNK + 1))
            h = c.layout(path)["chunks"][-1]["handle"]
        hi = int(h, 16)
        m.sync.pause()

        async def bump() -> None:
            reps = m.master.chunkmap.replicas_of(hi)
            await m.master.writes.bump_version(hi, reps[:2])

        fut = asyncio.run_coroutine_threadsafe(bump(), m.loop)
        assert m.sync.waiting.wait(10)
        m.heartbeats_seen(3)
    finally:
        m.crash()
    with pytest.raises(BaseException):  # noqa: B017 - the bump never became durable
        fut.result(10)
    assert chunk_files(cl, [h]) == 3
    cl.start_master()
    cl.wait_registered(3)
    with Client(cl.master_url, cl.token) as c:
        assert len(c.layout(path)["chunks"][-1]["replicas"]) == 3
        assert c.status()["under_replicated"] == 0


def test_a_build_started_before_its_capture_is_durable_leaves_only_garbage(gate_cluster):
    """A snapshot's build starts as soon as its capture is applied, while the capture becomes
    durable: with the log held, the record and blocks reach holders, but nothing is committed,
    and a master that lost the capture deletes them as garbage."""
    cl = gate_cluster
    d = f"/early-build-{random.randrange(1 << 30)}"
    sid = f"s-early-{random.randrange(1 << 30)}"

    def setup(c: Client) -> None:
        c.mkdir(d)
        c.put(f"{d}/f", b"x")

    def op(c: Client) -> None:
        c.snapshot_create(d, sid, id=sid)

    holder_saw: list[int] = []
    real_heartbeats_seen = InProcessMaster.heartbeats_seen

    def watch(self: InProcessMaster, rounds: int = 3) -> None:  # the record reached holders meanwhile
        deadline = time.monotonic() + 10
        while not record_files(cl, sid) and time.monotonic() < deadline:
            time.sleep(0.02)
        holder_saw.append(record_files(cl, sid))
        real_heartbeats_seen(self, rounds)

    InProcessMaster.heartbeats_seen = watch  # type: ignore[method-assign]
    try:
        c = unacknowledged(cl, setup, op)
    finally:
        InProcessMaster.heartbeats_seen = real_heartbeats_seen  # type: ignore[method-assign]
    assert holder_saw and holder_saw[0] >= 1  # shipped before its capture was durable
    assert all(s["id"] != sid for s in c.snapshot_list())
    deadline = time.monotonic() + 20
    while record_files(cl, sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert record_files(cl, sid) == 0  # the recovered master had the copies deleted
    c.close()
