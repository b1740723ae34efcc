"""Benchmarks on a real master that recovered a large checkpoint: end-to-end snapshot and
restore (``snapshot``), master memory (``memory``) and write latency during snapshots
(``during``)."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubegfs.master.oplog import write_checkpoint

from .report import MiB, Row, at_least, at_most, human_n, pct
from .trees import CHUNK_SIZE, Tree, state_with


def rss_of(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def _wait_snapshot(client: Any, sid: str, timeout: float = 900.0) -> dict[str, Any]:
    """Poll at a fixed 5 ms (Client.snapshot_wait backs off up to 0.5 s, which would blur timing)."""
    deadline = time.monotonic() + timeout
    while True:
        s: dict[str, Any] = client.snapshot_show(sid)
        if s["state"] == "ready":
            return s
        if s["state"] == "failed":
            raise RuntimeError(f"snapshot {s['name']} failed: {s.get('error')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"snapshot {s['name']} not ready after {timeout}s")
        time.sleep(0.005)


def snapshot_e2e(client: Any, path: str, name: str, long_poll: bool = True) -> tuple[float, dict[str, Any]]:
    """Capture → Ready as a user's client sees it: the create long-polled to Ready, as
    ``Client.snapshot_create`` asks (up to 5 s in the request), then, for a snapshot not Ready
    by then (a first one of a big tree), a 5 ms poll; without ``long_poll``, the 5 ms poll
    from the start (the ``during`` benchmark's pace of back-to-back snapshots)."""
    t0 = time.perf_counter()
    snap = client.api("POST", "/snapshots", json={"path": path, "name": name, "copies": 2},
                      params={"wait": "5"} if long_poll else None)
    done = snap if snap["state"] == "ready" else _wait_snapshot(client, snap["id"])
    return time.perf_counter() - t0, done


def wait_metadata_copies(client: Any, timeout: float = 600.0) -> float:
    """Wait until the master's metadata copies are in sync; the seconds waited. After a start
    the copies catch up from the checkpoint (1.1M files: about a second of the master's and two
    chunkservers' CPU), which a snapshot timed meanwhile would pay."""
    t0 = time.monotonic()
    while True:
        meta = client.status().get("metadata_replication", {})
        if meta.get("mode", "off") == "off" or int(meta.get("in_sync", 0)) >= int(meta.get("copies", 0)):
            break
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"metadata copies not in sync after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def empty_master_rss(tmp: Path) -> int:
    from kubegfs.local import LocalCluster

    c = LocalCluster(tmp / "empty", n_chunkservers=0)
    try:
        c.start()
        time.sleep(0.5)
        assert c.master.popen is not None
        return rss_of(c.master.popen.pid)
    finally:
        c.stop()
        shutil.rmtree(tmp / "empty", ignore_errors=True)


@dataclass
class ClusterCfg:
    snap_reps: dict[int, int]
    restore_reps: dict[int, int]
    modify_k: int = 100
    mem_snaps: int = 3
    during_seconds: float = 6.0
    during_reps: int = 2


def bench_cluster(trees: dict[int, Tree], tmp: Path, cfg: ClusterCfg, want: set[str],
                  say: Callable[[str], None]) -> list[Row]:
    """Write one checkpoint holding every tree, start a real master + 3 chunkservers on it."""
    from kubegfs.local import LocalCluster

    rows: list[Row] = []
    total = sum(t.files for t in trees.values())
    sizes = list(trees)
    samples = {n: t.sample_files for n, t in trees.items()}
    rss_empty = empty_master_rss(tmp) if "memory" in want else 0
    data = tmp / "cluster"
    say(f"writing a checkpoint with {total:,} files")
    st = state_with(trees)
    (data / "master").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ck = write_checkpoint(data / "master", st.checkpoint_view())
    ck_seconds = time.perf_counter() - t0
    ck_bytes = ck.stat().st_size
    del st
    gc.collect()
    cluster = LocalCluster(data, n_chunkservers=3, chunk_size=CHUNK_SIZE, replication=3)
    try:
        say("starting the master (recovering from the checkpoint)")
        t0 = time.perf_counter()
        cluster.start_master(timeout=900)
        load_seconds = time.perf_counter() - t0
        for p in cluster.chunkservers:
            cluster.start_chunkserver(p, wait=False)
        cluster.wait_registered(3, 120)
        assert cluster.master.popen is not None
        mpid = cluster.master.popen.pid
        rss_loaded = rss_of(mpid)
        client = cluster.client()
        st_t0 = time.perf_counter()
        status = client.status()
        status_seconds = time.perf_counter() - st_t0
        say(f"master up: {status['files']:,} files in {load_seconds:.1f}s; /status took {status_seconds * 1e3:.0f} ms")
        synced = wait_metadata_copies(client)
        say(f"metadata copies in sync after {synced:.1f}s more")
        if "memory" in want:
            per_m = (rss_loaded - rss_empty) / (total / 1e6) / MiB
            rows.append(Row("memory", "master RSS per million files", "MiB", [per_m],
                            extra={"rss_loaded": rss_loaded, "rss_empty": rss_empty, "files": total,
                                   "load_seconds": load_seconds, "checkpoint_bytes": ck_bytes,
                                   "checkpoint_write_seconds": ck_seconds,
                                   "status_seconds": status_seconds}))
        first_growth: float | None = None
        if "snapshot" in want or "memory" in want:
            for n in sizes:
                ts, bpf = [], 0.0
                server = []
                reps = cfg.snap_reps.get(n, 3) if "snapshot" in want else 1
                for r in range(reps):
                    say(f"snapshot of {human_n(n)} files ({r + 1}/{reps})")
                    before = rss_of(mpid)
                    t, done = snapshot_e2e(client, f"/t{n}", f"e2e-{n}-{r}")
                    if r == 0 and n == max(sizes):
                        first_growth = (rss_of(mpid) - before) / MiB
                    ts.append(t)
                    server.append(done["duration_seconds"])
                    if r == 0:  # the first snapshot ships every block; later ones (unchanged) none
                        bpf = done.get("shipped_bytes", done["record_bytes"]) / done["files"]
                if "snapshot" in want:  # the first ships every block; later ones of the unchanged tree none
                    rows.append(at_least(Row("snapshot", f"end-to-end first snapshot, {human_n(n)} files", "files/s",
                                             [n / ts[0]],
                                             extra={"files": n, "seconds": ts[:1], "server_seconds": server[:1]}),
                                         1_000_000, "≥ 1M files/s"))
                    if len(ts) > 1:
                        rows.append(at_least(Row("snapshot", f"end-to-end snapshot of the unchanged tree, "
                                                 f"{human_n(n)} files", "files/s", [n / t for t in ts[1:]],
                                                 extra={"files": n, "seconds": ts[1:],
                                                        "server_seconds": server[1:]}),
                                             500_000, "≥ 500k files/s"))
                    rows.append(at_most(Row("snapshot", f"record size (blocks + record), {human_n(n)} files",
                                            "B/file", [bpf], extra={"files": n}), 40, "≤ 40 B/file"))
                    rows += bench_incremental(client, n, samples[n], cfg, say)
        if "memory" in want:
            n = max(sizes)
            growth = []
            files = samples[n]
            k = min(cfg.modify_k, len(files))
            for i in range(cfg.mem_snaps):
                say(f"memory: modify {k} files, snapshot {human_n(n)} ({i + 1}/{cfg.mem_snaps})")
                for j in range(k):
                    client.put(f"/t{n}/{files[(i * k + j) % len(files)]}", b"m" * 1024)
                before = rss_of(mpid)
                snapshot_e2e(client, f"/t{n}", f"mem-{n}-{i}")
                time.sleep(0.2)
                growth.append((rss_of(mpid) - before) / MiB)
            per_file_mib = (rss_loaded - rss_empty) / max(total, 1) / MiB
            row = Row("memory", f"RSS growth per snapshot, {human_n(n)} files, {k} modified", "MiB", growth,
                      extra={"files": n, "modified": k, "first_snapshot_growth_mib": first_growth,
                             "o_files_equivalent_mib": per_file_mib * n})
            # O(modified): well under what a copy of the tree's metadata would cost
            rows.append(at_most(row, max(0.05 * per_file_mib * n, 1.0), "O(modified), ≪ tree size"))
            if first_growth is not None:
                rows.append(Row("memory", f"RSS growth, first snapshot of {human_n(n)} files", "MiB",
                                [first_growth], extra={"files": n}))
        if "during" in want:
            rows += bench_during(cluster, max(sizes), cfg, say)
        if "snapshot" in want:
            for n in sizes:
                new, inplace = [], []
                for r in range(cfg.restore_reps.get(n, 3)):
                    say(f"restore of {human_n(n)} files ({r + 1})")
                    t0 = time.perf_counter()
                    client.snapshot_restore(f"e2e-{n}-0", to=f"/r{n}-{r}")
                    new.append(time.perf_counter() - t0)
                    client.rm(f"/r{n}-{r}", recursive=True)
                    t0 = time.perf_counter()
                    client.snapshot_restore(f"e2e-{n}-0")
                    inplace.append(time.perf_counter() - t0)
                for mode, ts in (("to a new path", new), ("in place", inplace)):
                    row = Row("restore", f"restore {mode}, {human_n(n)} files", "s", ts, extra={"files": n})
                    if n == 100_000:
                        at_most(row, 1.0, "≤ 1 s")
                    rows.append(row)
        client.close()
    finally:
        cluster.stop()
        shutil.rmtree(data, ignore_errors=True)
    return rows


def bench_incremental(client: Any, n: int, files: list[str], cfg: ClusterCfg,
                      say: Callable[[str], None]) -> list[Row]:
    """After K files changed: capture → Ready of the next snapshot, bytes shipped per copy, the
    diff of the two snapshots, and a restore in place that undoes the K changes."""
    k = min(cfg.modify_k, len(files))
    ready, shipped, diff_s, diff_server, restore_s, fetched = [], [], [], [], [], []
    prev = f"e2e-{n}-0"
    for r in range(cfg.snap_reps.get(n, 3)):
        say(f"incremental: {k} of {human_n(n)} files changed, snapshot, diff, restore ({r + 1})")
        for j in range(k):
            client.put(f"/t{n}/{files[(r * k + j) % len(files)]}", b"c" * 512)
        name = f"inc-{n}-{r}"
        t0 = time.perf_counter()
        snap = client.snapshot_create(f"/t{n}", name)  # long-polls until Ready
        ready.append(time.perf_counter() - t0)
        shipped.append(float(snap["shipped_bytes"]))
        t0 = time.perf_counter()
        d = client.snapshot_diff(prev, name)
        diff_s.append(time.perf_counter() - t0)
        diff_server.append(d["seconds"])
        for j in range(k):  # change them again, then undo that with a restore in place
            client.put(f"/t{n}/{files[(r * k + j) % len(files)]}", b"u" * 256)
        t0 = time.perf_counter()
        out = client.snapshot_restore(name)
        restore_s.append(time.perf_counter() - t0)
        fetched.append(out.get("blocks_fetched", 0))
        prev = name
    ex = {"files": n, "changed": k}
    rows = [
        Row("snapshot", f"capture → Ready after {k} changed, {human_n(n)} files", "s", ready, extra=ex),
        Row("snapshot", f"bytes shipped per copy after {k} changed, {human_n(n)} files", "B", shipped, extra=ex),
        Row("snapshot", f"diff of snapshots {k} files apart, {human_n(n)} files", "s", diff_s,
            extra={**ex, "server_seconds": diff_server}),
        Row("restore", f"restore in place after {k} changed, {human_n(n)} files", "s", restore_s,
            extra={**ex, "blocks_fetched": fetched}),
    ]
    if n >= 1_000_000:
        at_most(rows[0], 0.020, "≤ 20 ms")
        at_most(rows[1], 64 * 1024, "≤ 64 KiB")
        at_most(rows[2], 0.020, "≤ 20 ms")
        at_most(rows[3], 0.050, "≤ 50 ms")
    return rows


class WriteStream:
    """A writer thread streaming alternating mkdirs and 4 KiB creates under /w, each op's
    latency and kind (1: mkdir) recorded, until stopped."""

    def __init__(self, writer: Any, payload: bytes, seq: int) -> None:
        self.writer, self.payload, self.seq = writer, payload, seq
        self.lat: list[float] = []
        self.kinds: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.seq += 1
            t0 = time.perf_counter()
            if self.seq % 2:
                self.writer.mkdir(f"/w/d{self.seq}")
            else:
                self.writer.put(f"/w/f{self.seq}", self.payload)
            self.lat.append(time.perf_counter() - t0)
            self.kinds.append(self.seq % 2)

    def end(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.seq

    def detail(self) -> dict[str, Any]:
        lat, kinds = self.lat, self.kinds
        return {
            "ops": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat, default=0.0),
            "p99_mkdir": pct([x for x, kd in zip(lat, kinds, strict=False) if kd], 0.99),
            "p99_put_4k": pct([x for x, kd in zip(lat, kinds, strict=False) if not kd], 0.99),
        }


def bench_during(cluster: Any, n: int, cfg: ClusterCfg, say: Callable[[str], None]) -> list[Row]:
    """A writer streams mkdirs and 4 KiB creates; p99 while snapshots run back to back vs
    without. The tree gets one snapshot before the rounds, so every round times snapshots of a
    tree that has one, whether or not the ``snapshot`` bench ran first; the writer runs during
    that first one too (its longest write is a row of its own: a first snapshot's commit and
    clean-up on the master's event loop show there)."""
    writer = cluster.client()
    poller = cluster.client()
    writer.mkdir("/w", parents=True)
    payload = os.urandom(4096)
    say(f"a first snapshot of {human_n(n)} files before the write rounds, with the writer on")
    first = WriteStream(writer, payload, 0)
    try:
        snapshot_e2e(poller, f"/t{n}", f"during-{n}-first", long_poll=False)
    finally:
        seq = first.end()
    ratios: list[float] = []
    base_p99: list[float] = []
    during_p99: list[float] = []
    counts: list[int] = []
    detail: list[dict[str, Any]] = [{"phase": "first snapshot", **first.detail()}]
    try:
        for rep in range(cfg.during_reps):
            for phase in ("baseline", "during"):
                say(f"writes {'during snapshots of ' + human_n(n) + ' files' if phase == 'during' else 'without a snapshot'} ({rep + 1}/{cfg.during_reps})")
                ws = WriteStream(writer, payload, seq)
                end = time.monotonic() + cfg.during_seconds
                k = 0
                try:
                    while time.monotonic() < end:
                        if phase == "during":
                            snapshot_e2e(poller, f"/t{n}", f"during-{n}-{rep}-{k}", long_poll=False)
                            k += 1
                        else:  # the same polling load, without a snapshot
                            poller.stat("/w")
                            time.sleep(0.005)
                finally:
                    seq = ws.end()
                (base_p99 if phase == "baseline" else during_p99).append(pct(ws.lat, 0.99))
                counts.append(len(ws.lat))
                detail.append({"phase": phase, "snapshots": k, **ws.detail()})
            ratios.append(during_p99[-1] / base_p99[-1])
    finally:
        writer.close()
        poller.close()
    return [
        Row("during", "write p99 without snapshot", "s", base_p99, extra={"detail": detail}),
        Row("during", f"write p99 during {human_n(n)}-file snapshots", "s", during_p99),
        at_most(Row("during", "p99 during / without", "x", ratios, extra={"ops": counts}), 1.5, "≤ 1.5×"),
        Row("during", f"longest write during a first {human_n(n)}-file snapshot", "s", [first.detail()["max"]],
            extra=first.detail()),
    ]
