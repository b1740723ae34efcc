"""kubegfs benchmarks: ``python -m kubegfs.bench [--quick] [--out DIR] [--only NAME,...]``.

Every figure is the median of several runs (min–max shown). Speed claims are measured as
ratios *in the same run* (the seed's deep copy + pickle, the disk's own fdatasync speed, loopback
TCP), so they hold on a noisy shared machine. Nothing here asserts a threshold: the ✓/✗ column is
informational, and the process exits 0 unless the benchmark code itself breaks.

Benchmarks (``--only`` names):

* ``capture``    in-loop cost of pinning a snapshot: ``MasterState.apply(snap_capture)``
* ``seed``       the same trees captured the seed's way: ``copy.deepcopy`` + ``pickle.dumps``
* ``snapshot``   end-to-end snapshot and restore (new path / in place) on a real master that
                 recovered the N-file state from a checkpoint written offline
* ``memory``     master RSS per million files, RSS growth per snapshot after modifying K files
* ``during``     p99 latency of a write stream while snapshots are being taken vs without
* ``throughput`` durable creates/s from 1/4/16 client threads, stat/s and ls/s
* ``datapath``   1 GiB put/get at RF=3 vs the machine's disk and loopback ceilings
* ``recovery``   durable creates with metadata replication sync/async/off; ``master recover``
                 time of the largest size (``bench_recovery.py``)

Outputs: a table on stdout, ``DIR/results.json`` (raw samples + machine), PNG plots in ``DIR``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import pickle
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import immutables
import requests

from . import namespace as ns
from .master.oplog import write_checkpoint
from .master.state import MasterState, now_ns

MiB = 1 << 20
GiB = 1 << 30
CHUNK_SIZE = 64 * MiB
FILES_PER_DIR = 250
ALL = ("capture", "seed", "snapshot", "memory", "during", "throughput", "datapath", "operator", "recovery")
CLUSTER_BENCHES = {"snapshot", "memory", "during"}


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: a metric measured ``len(samples)`` times."""

    bench: str
    case: str
    unit: str  # s, files/s, B/file, ops/s, MB/s, x, MiB
    samples: list[float]
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=self.lo, max=self.hi)
        return d


def at_most(row: Row, limit: float, label: str) -> Row:
    row.target = label
    row.met = row.median <= limit
    return row


def at_least(row: Row, limit: float, label: str) -> Row:
    row.target = label
    row.met = row.median >= limit
    return row


def fmt(v: float, unit: str) -> str:
    if v != v:  # NaN
        return "—"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.1f} µs"
        if v < 1:
            return f"{v * 1e3:.1f} ms"
        return f"{v:.2f} s"
    if unit == "x":
        return f"{v:,.0f}×" if v >= 10 else f"{v:.2f}×"
    if unit in ("files/s", "ops/s"):
        return f"{v / 1e6:.2f} M/s" if v >= 1e6 else f"{v:,.0f}/s"
    if unit == "MB/s":
        return f"{v:,.0f} MB/s"
    if unit == "B/file":
        return f"{v:.1f} B/file"
    if unit == "MiB":
        return f"{v:,.1f} MiB"
    return f"{v:.3g} {unit}"


def human_n(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        import psutil

        ram = int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        pass
    commit = ""
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram,
        "ram_gib": round(ram / GiB, 1), "python": platform.python_version(),
        "platform": platform.platform(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
    }


# --------------------------------------------------------------------------- synthetic trees


@dataclass
class Tree:
    """A synthetic directory of ``files`` files (nested, realistic names, random sizes)."""

    files: int
    root: ns.Dir
    first: int  # first chunk handle; handles are first .. first + chunks - 1
    chunks: int
    dirs: int
    sample_files: list[str]  # a few file paths relative to the tree root


def _leaf_path(i: int) -> tuple[str, ...]:
    q, kind = divmod(i, 3)
    if kind == 0:
        return ("logs", str(2020 + q // 336), f"{(q // 28) % 12 + 1:02d}", f"{q % 28 + 1:02d}")
    if kind == 1:
        return ("data", f"team-{q % 16:02d}", f"dataset-{(q // 16) % 64:02d}",
                f"dt=2026-{(q // 1024) % 12 + 1:02d}-{(q // 12288) + 1:02d}")
    return ("home", f"user{q % 100:03d}", "projects", f"proj-{q // 100}", "src")


def _file_name(kind: int, j: int, r: int) -> str:
    if kind == 0:
        return f"app-{r:08x}-{j:04d}.log"
    if kind == 1:
        return f"part-{j:05d}-{r:08x}{r ^ 0x5bd1e995:08x}.snappy.parquet"
    return f"module_{r & 0xFFFFFF:06x}_{j}.py"


def make_tree(files: int, first_handle: int, seed: int = 7, chunk_size: int = CHUNK_SIZE) -> Tree:
    """Build the tree directly from Dir/File nodes and immutables.Map (no per-file ops)."""
    rng = random.Random(seed)
    mtime = now_ns()
    nested: dict[str, Any] = {}
    h = first_handle
    left = files
    leaf = 0
    samples: list[str] = []
    lognorm = rng.lognormvariate
    bits = rng.getrandbits
    while left > 0:
        k = min(FILES_PER_DIR, left)
        path = _leaf_path(leaf)
        kind = leaf % 3
        pairs = []
        for j in range(k):
            size = min(int(lognorm(11.0, 2.5)), 1 << 40)  # median ~60 KB, a long tail of big files
            n = -(-size // chunk_size)
            pairs.append((_file_name(kind, j, bits(32)),
                          ns.File(size, mtime - bits(30), 0o644, tuple(range(h, h + n)))))
            h += n
        if len(samples) < 4096:
            samples.append("/".join((*path, pairs[leaf % k][0])))
        d = nested
        for part in path[:-1]:
            d = d.setdefault(part, {})
        d[path[-1]] = immutables.Map(pairs)
        left -= k
        leaf += 1
    dirs = 0

    def build(d: dict[str, Any] | immutables.Map) -> ns.Dir:
        nonlocal dirs
        dirs += 1
        if isinstance(d, immutables.Map):
            return ns.Dir(d, mtime)
        return ns.Dir(immutables.Map({k: build(v) for k, v in d.items()}), mtime)

    root = build(nested)
    return Tree(files, root, first_handle, h - first_handle, dirs, samples)


def make_trees(sizes: list[int]) -> dict[int, Tree]:
    """Trees with disjoint handle ranges (incarnation 1), so they can share one master."""
    out: dict[int, Tree] = {}
    nxt = (1 << 32) | 1
    for i, n in enumerate(sizes):
        t = make_tree(n, nxt, seed=1000 + i)
        out[n] = t
        nxt += t.chunks
    return out


def state_with(trees: dict[int, Tree]) -> MasterState:
    st = MasterState(CHUNK_SIZE, 3)
    st.incarnation = 1
    st.root = ns.Dir(immutables.Map({f"t{n}": t.root for n, t in trees.items()}), now_ns())
    for t in trees.values():
        rng = range(t.first, t.first + t.chunks)
        st.version.update(dict.fromkeys(rng, 1))
        st.born.update(dict.fromkeys(rng, 1))
        st.live.update(dict.fromkeys(rng, 1))
        st.next_counter = max(st.next_counter, (t.first + t.chunks) & 0xFFFFFFFF)
    st.seq = 1
    return st


def seed_metadata(node: ns.Node, version: dict[int, int]) -> dict[str, Any]:
    """The seed's plain dict/list metadata tree for ``node``."""
    if isinstance(node, ns.File):
        return {"type": "file", "size": node.size, "mtime": node.mtime, "mode": node.mode,
                "chunks": [[h, version.get(h, 1)] for h in node.chunks]}
    return {"type": "dir", "mtime": node.mtime, "mode": node.mode,
            "children": {k: seed_metadata(v, version) for k, v in node.children.items()}}


# --------------------------------------------------------------------------- 1 + 3: in-process


def bench_capture(trees: dict[int, Tree], repeats: int = 201) -> list[Row]:
    """Time MasterState.apply of a snap_capture op on a state holding all the trees."""
    st = state_with(trees)
    rows = []
    times: dict[int, list[float]] = {}
    for n in trees:
        samples = []
        for r in range(repeats):
            op = {"op": "snap_capture", "id": f"c-{n}-{r}", "name": f"c-{n}-{r}", "path": f"/t{n}",
                  "created": now_ns(), "copies": 2, "seq": st.seq + 1}
            t0 = time.perf_counter_ns()
            st.apply(op)
            samples.append((time.perf_counter_ns() - t0) / 1e9)
        st.pins.clear()
        times[n] = samples
        rows.append(at_most(Row("capture", f"capture pause, {human_n(n)} files", "s", samples,
                                extra={"files": n}), 0.010, "≤ 10 ms"))
    if len(times) >= 2:
        small, big = min(times), max(times)
        ratio = statistics.median(times[big]) / statistics.median(times[small])
        rows.append(at_most(Row("capture", f"t({human_n(big)}) / t({human_n(small)})", "x", [ratio],
                                extra={"small": small, "big": big}), 2.0, "≤ 2×"))
    return rows


def bench_seed(trees: dict[int, Tree], capture_rows: list[Row], repeats: dict[int, int]) -> list[Row]:
    """The seed's capture: deepcopy the metadata subtree, then pickle it (in process only)."""
    version: dict[int, int] = {}
    rows = []
    cap = {r.extra.get("files"): r.median for r in capture_rows if "files" in r.extra}
    for n, t in trees.items():
        meta = {"/": seed_metadata(t.root, version)}
        samples = []
        size = 0
        for _ in range(repeats.get(n, 3)):
            gc.collect()
            t0 = time.perf_counter()
            snap = copy.deepcopy(meta["/"])
            # the seed pickled its deep copy: this is the baseline being measured, not a use of
            # pickle by kubegfs (the only pickle call in the repository)
            blob = pickle.dumps(snap)  # noqa: S301
            samples.append(time.perf_counter() - t0)
            size = len(blob)
            del snap, blob
        del meta
        rows.append(Row("seed", f"seed capture (deepcopy+pickle), {human_n(n)} files", "s", samples,
                        extra={"files": n, "pickle_bytes": size}))
        rows.append(Row("seed", f"seed bytes per file, {human_n(n)} files", "B/file", [size / n],
                        extra={"files": n}))
        if n in cap and cap[n] > 0:
            ratios = [s / cap[n] for s in samples]
            rows.append(at_least(Row("seed", f"seed / kubegfs capture, {human_n(n)} files", "x", ratios,
                                     extra={"files": n}), 100, "≥ 100×"))
    return rows


# --------------------------------------------------------------------------- cluster helpers


def _wait_http(url: str, timeout: float, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout}s")
        time.sleep(0.1)


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


def snapshot_e2e(client: Any, path: str, name: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    snap = client.snapshot_create(path, name, wait=False)
    done = _wait_snapshot(client, snap["id"])
    return time.perf_counter() - t0, done


def empty_master_rss(tmp: Path) -> int:
    from .local import LocalCluster

    c = LocalCluster(tmp / "empty", n_chunkservers=0)
    try:
        c.start()
        time.sleep(0.5)
        assert c.master.popen is not None
        return rss_of(c.master.popen.pid)
    finally:
        c.stop()
        shutil.rmtree(tmp / "empty", ignore_errors=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# --------------------------------------------------------------------------- 2, 6, 7: big master


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
    from .local import LocalCluster

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
        cluster.start_master(wait=False)
        _wait_http(cluster.master.url + "/healthz", 900, cluster.master.popen)
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
                    bpf = done["record_bytes"] / done["files"]
                if "snapshot" in want:
                    rows.append(at_least(Row("snapshot", f"end-to-end snapshot, {human_n(n)} files", "files/s",
                                             [n / t for t in ts],
                                             extra={"files": n, "seconds": ts, "server_seconds": server}),
                                         500_000, "≥ 500k files/s"))
                    rows.append(at_most(Row("snapshot", f"record size, {human_n(n)} files", "B/file", [bpf],
                                            extra={"files": n}), 40, "≤ 40 B/file"))
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


def bench_during(cluster: Any, n: int, cfg: ClusterCfg, say: Callable[[str], None]) -> list[Row]:
    """A writer streams mkdirs and 4 KiB creates; p99 while snapshots run vs without."""
    writer = cluster.client()
    poller = cluster.client()
    writer.mkdir("/w", parents=True)
    payload = os.urandom(4096)
    ratios: list[float] = []
    base_p99: list[float] = []
    during_p99: list[float] = []
    counts: list[int] = []
    detail: list[dict[str, Any]] = []
    seq = 0
    try:
        for rep in range(cfg.during_reps):
            for phase in ("baseline", "during"):
                say(f"writes {'during snapshots of ' + human_n(n) + ' files' if phase == 'during' else 'without a snapshot'} ({rep + 1}/{cfg.during_reps})")
                lat: list[float] = []
                kinds: list[int] = []
                stop = threading.Event()

                def write_stream(lat: list[float] = lat, kinds: list[int] = kinds,
                                 stop: threading.Event = stop) -> None:
                    nonlocal seq
                    while not stop.is_set():
                        seq += 1
                        t0 = time.perf_counter()
                        if seq % 2:
                            writer.mkdir(f"/w/d{seq}")
                        else:
                            writer.put(f"/w/f{seq}", payload)
                        lat.append(time.perf_counter() - t0)
                        kinds.append(seq % 2)

                th = threading.Thread(target=write_stream, daemon=True)
                th.start()
                end = time.monotonic() + cfg.during_seconds
                k = 0
                try:
                    while time.monotonic() < end:
                        if phase == "during":
                            snapshot_e2e(poller, f"/t{n}", f"during-{n}-{rep}-{k}")
                            k += 1
                        else:  # the same polling load, without a snapshot
                            poller.stat("/w")
                            time.sleep(0.005)
                finally:
                    stop.set()
                    th.join()
                (base_p99 if phase == "baseline" else during_p99).append(pct(lat, 0.99))
                counts.append(len(lat))
                detail.append({
                    "phase": phase, "ops": len(lat), "snapshots": k,
                    "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat, default=0.0),
                    "p99_mkdir": pct([x for x, kd in zip(lat, kinds, strict=False) if kd], 0.99),
                    "p99_put_4k": pct([x for x, kd in zip(lat, kinds, strict=False) if not kd], 0.99),
                })
            ratios.append(during_p99[-1] / base_p99[-1])
    finally:
        writer.close()
        poller.close()
    return [
        Row("during", "write p99 without snapshot", "s", base_p99, extra={"detail": detail}),
        Row("during", f"write p99 during {human_n(n)}-file snapshots", "s", during_p99),
        at_most(Row("during", "p99 during / without", "x", ratios, extra={"ops": counts}), 1.5, "≤ 1.5×"),
    ]


# --------------------------------------------------------------------------- 4 + 5: small cluster


def _threads(n: int, fn: Callable[[int, float], int], seconds: float) -> float:
    """Run fn(thread_index, deadline) on n threads; ops/s over the wall time."""
    counts = [0] * n
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            counts[i] = fn(i, time.monotonic() + seconds)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / wall


class RawHTTP:
    """A bare keep-alive HTTP/1.1 connection: shows what the master serves when the client
    library (``requests``) is not the bottleneck."""

    def __init__(self, host: str, port: int, token: str) -> None:
        import http.client

        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        self.conn.request(method, path, body=None if body is None else json.dumps(body),
                          headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def raw_creates(cluster: Any, base: str, i: int, deadline: float) -> int:
    """Thread ``i``: mkdirs under ``base`` over one keep-alive connection until ``deadline``."""
    conn = RawHTTP(cluster.master.host, cluster.master.port, cluster.token)
    k = 0
    try:
        while time.monotonic() < deadline:
            conn.call("POST", "/api/v1/fs/mkdir", {"path": f"{base}/w{i}-{k}"})
            k += 1
    finally:
        conn.close()
    return k


def bench_throughput(cluster: Any, seconds: float, reps: int, say: Callable[[str], None]) -> list[Row]:
    rows = []
    clients = [cluster.client() for _ in range(16)]
    try:
        for nt in (1, 4, 16):
            rates = []
            for r in range(reps):
                say(f"durable creates (mkdir), {nt} threads ({r + 1}/{reps})")
                base = f"/tp{nt}-{r}"
                clients[0].mkdir(base)

                def creates(i: int, deadline: float, base: str = base) -> int:
                    c = clients[i]
                    k = 0
                    while time.monotonic() < deadline:
                        c.mkdir(f"{base}/w{i}-{k}")
                        k += 1
                    return k

                rates.append(_threads(nt, creates, seconds))
            rows.append(at_least(Row("throughput", f"durable creates, {nt} client threads", "ops/s", rates,
                                     extra={"threads": nt}), 2000, "≥ 2,000/s"))
        for nt in (16,):
            rates = []
            for r in range(reps):
                say(f"durable creates over raw HTTP keep-alive, {nt} connections ({r + 1}/{reps})")
                base = f"/raw{nt}-{r}"
                clients[0].mkdir(base)
                rates.append(_threads(nt, partial(raw_creates, cluster, base), seconds))
            rows.append(at_least(Row("throughput", f"durable creates, raw HTTP, {nt} connections", "ops/s",
                                     rates, extra={"threads": nt, "client": "http.client"}),
                                 2000, "≥ 2,000/s"))
        c0 = clients[0]
        c0.mkdir("/st")
        for i in range(100):
            c0.mkdir(f"/st/e{i}")
        for op in ("stat", "ls"):
            for nt in (1, 4):
                rates = []
                for r in range(reps):
                    say(f"{op}, {nt} threads ({r + 1}/{reps})")

                    def reads(i: int, deadline: float, op: str = op) -> int:
                        c = clients[i]
                        k = 0
                        while time.monotonic() < deadline:
                            if op == "stat":
                                c.stat(f"/st/e{k % 100}")
                            else:
                                c.ls("/st")
                            k += 1
                        return k

                    rates.append(_threads(nt, reads, seconds))
                rows.append(at_least(Row("throughput", f"{op} (100-entry dir), {nt} client threads", "ops/s",
                                         rates, extra={"threads": nt}), 5000, "≥ 5,000/s"))
        rates = []
        for r in range(reps):
            say(f"stat over raw HTTP keep-alive, 4 connections ({r + 1}/{reps})")

            def raw_stats(i: int, deadline: float) -> int:
                conn = RawHTTP(cluster.master.host, cluster.master.port, cluster.token)
                k = 0
                try:
                    while time.monotonic() < deadline:
                        conn.call("GET", f"/api/v1/fs/stat?path=/st/e{k % 100}")
                        k += 1
                finally:
                    conn.close()
                return k

            rates.append(_threads(4, raw_stats, seconds))
        rows.append(at_least(Row("throughput", "stat, raw HTTP, 4 connections", "ops/s", rates,
                                 extra={"threads": 4, "client": "http.client"}), 5000, "≥ 5,000/s"))
    finally:
        for c in clients:
            c.close()
    return rows


def disk_ceiling(d: Path, size: int) -> float:
    buf = os.urandom(4 * MiB)
    p = d / "ceiling.bin"
    t0 = time.perf_counter()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, buf[: min(left, len(buf))])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    t = time.perf_counter() - t0
    p.unlink()
    return size / t / 1e6


def loopback_ceiling(size: int) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = [0]

    def recv() -> None:
        conn, _ = srv.accept()
        buf = bytearray(1 * MiB)
        with conn:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                got[0] += n

    th = threading.Thread(target=recv, daemon=True)
    th.start()
    data = memoryview(os.urandom(4 * MiB))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = size
        while left > 0:
            n = min(left, len(data))
            s.sendall(data[:n])
            left -= n
    th.join()
    t = time.perf_counter() - t0
    srv.close()
    return got[0] / t / 1e6


class _Sink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


def bench_datapath(cluster: Any, size: int, reps: int, say: Callable[[str], None]) -> list[Row]:
    say("ceilings: disk fdatasync and loopback TCP")
    disk = [disk_ceiling(cluster.data_dir, max(size, 256 * MiB)) for _ in range(reps)]
    loop = [loopback_ceiling(2 * size) for _ in range(reps)]
    block = os.urandom(4 * MiB)

    def pieces() -> Iterator[bytes]:
        for i in range(size // len(block)):
            yield block[: -8] + i.to_bytes(8, "little")

    c = cluster.client()
    puts, gets = [], []
    try:
        for r in range(reps):
            say(f"put {size // MiB} MiB at RF=3 ({r + 1}/{reps})")
            t0 = time.perf_counter()
            c.put("/big.bin", pieces())
            puts.append(size / (time.perf_counter() - t0) / 1e6)
            say(f"get {size // MiB} MiB ({r + 1}/{reps})")
            sink = _Sink()
            t0 = time.perf_counter()
            c.get_to("/big.bin", sink)
            gets.append(sink.n / (time.perf_counter() - t0) / 1e6)
    finally:
        c.close()
    d = statistics.median(disk)
    return [
        Row("datapath", "ceiling: sequential write + fdatasync", "MB/s", disk,
            extra={"bytes": max(size, 256 * MiB)}),
        Row("datapath", "ceiling: loopback TCP copy", "MB/s", loop, extra={"bytes": 2 * size}),
        at_least(Row("datapath", f"put {human_mib(size)} at RF=3", "MB/s", puts, extra={"bytes": size}),
                 0.8 * d / 3, f"≥ 0.8×disk/3 = {0.8 * d / 3:,.0f}"),
        at_least(Row("datapath", f"get {human_mib(size)}", "MB/s", gets, extra={"bytes": size}), 500, "≥ 500 MB/s"),
    ]


def human_mib(b: int) -> str:
    return f"{b // GiB} GiB" if b >= GiB and b % GiB == 0 else f"{b // MiB} MiB"


def bench_small_cluster(tmp: Path, want: set[str], quick: bool, say: Callable[[str], None]) -> list[Row]:
    from .local import LocalCluster

    rows: list[Row] = []
    cluster = LocalCluster(tmp / "small", n_chunkservers=3, chunk_size=CHUNK_SIZE, replication=3)
    try:
        say("starting a master + 3 chunkservers")
        cluster.start()
        if "throughput" in want:
            rows += bench_throughput(cluster, 1.0 if quick else 3.0, 2 if quick else 3, say)
        if "datapath" in want:
            rows += bench_datapath(cluster, 64 * MiB if quick else GiB, 2 if quick else 3, say)
    finally:
        cluster.stop()
        shutil.rmtree(tmp / "small", ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- output


def bench_operator(tmp: Path, quick: bool, say: Callable[[str], None]) -> list[Row]:
    """Snapshot CR -> Ready latency through the real kube-apiserver and operator, a burst of CRs
    applied at once, and the operator's RSS."""

    from .k8s.controlplane import ControlPlane
    from .k8s.stack import K8sStack, NodeSpec, PodSpec

    seq_n, burst_n = (10, 20) if quick else (50, 100)
    say("operator: starting kube-apiserver, cluster and operator")
    cp = ControlPlane(state_dir=tmp / "cp")
    cp.start()
    nodes = [NodeSpec("bn-a", "zone-a", "r1"), NodeSpec("bn-b", "zone-b", "r1"), NodeSpec("bn-c", "zone-c", "r1")]
    stack = K8sStack(cp, "bench", tmp / "stack", nodes, master=PodSpec("master-0", "bn-a", "127.0.40.1"),
                     chunkservers=[PodSpec("cs-0", "bn-a", "127.0.40.2"), PodSpec("cs-1", "bn-b", "127.0.41.1"),
                                   PodSpec("cs-2", "bn-c", "127.0.42.1")])
    try:
        stack.start()
        c = stack.cluster.client()
        c.mkdir("/data")
        c.put("/data/f", b"x" * 10_000)

        def doc(name: str) -> str:
            return (f"apiVersion: kubegfs.io/v1alpha1\nkind: Snapshot\nmetadata: {{name: {name}}}\n"
                    f"spec: {{path: /data, copies: 2}}\n")

        def ready(name: str) -> bool:
            return stack.condition("snapshots", name) == "True"

        lat: list[float] = []
        for i in range(seq_n):
            say(f"operator: Snapshot CR -> Ready {i + 1}/{seq_n}")
            t0 = time.perf_counter()
            stack.kubectl("apply", "-f", "-", input=doc(f"seq-{i}"))
            while not ready(f"seq-{i}"):
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"seq-{i} not Ready after 120s")
                time.sleep(0.01)
            lat.append(time.perf_counter() - t0)
        say(f"operator: {burst_n} Snapshot CRs at once")
        docs = "---\n".join(doc(f"burst-{i}") for i in range(burst_n))
        t0 = time.perf_counter()
        stack.kubectl("apply", "-f", "-", input=docs)
        pending = {f"burst-{i}" for i in range(burst_n)}
        while pending:
            items = stack.custom.list_namespaced_custom_object("kubegfs.io", "v1alpha1", stack.ns, "snapshots")["items"]
            for it in items:
                conds = {x["type"]: x["status"] for x in (it.get("status") or {}).get("conditions") or []}
                if conds.get("Ready") == "True":
                    pending.discard(it["metadata"]["name"])
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{len(pending)} burst CRs not Ready after 600s")
            time.sleep(0.1)
        burst = time.perf_counter() - t0
        assert stack.operator is not None
        rss = rss_of(stack.operator.pid) / (1 << 20)
    finally:
        stack.stop()
        cp.stop()
    return [
        at_most(Row("operator", f"Snapshot CR -> Ready p50 ({seq_n} CRs, first one included)", "s", lat),
                1.0, "≤ 1 s"),
        at_most(Row("operator", f"Snapshot CR -> Ready p95 ({seq_n} CRs)", "s", [pct(lat, 0.95)],
                    extra={"samples": lat}), 1.0, "≤ 1 s"),
        at_most(Row("operator", f"{burst_n} CRs at once -> all Ready", "s", [burst]),
                20.0 * burst_n / 100, f"≤ {20 * burst_n // 100} s"),
        at_most(Row("operator", "operator RSS", "MiB", [rss]), 150, "≤ 150 MiB"),
    ]


def render_table(rows: list[Row], machine: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"kubegfs benchmarks — {machine['cpu']}, {machine['cores']} cores, "
                    f"{machine['ram_gib']} GiB, Python {machine['python']}")
    for col in ("benchmark", "case"):
        t.add_column(col)
    for col in ("median", "min–max", "runs"):
        t.add_column(col, justify="right")
    t.add_column("target")
    t.add_column("met", justify="center")
    for r in rows:
        met = "" if r.met is None else ("[green]✓[/]" if r.met else "[red]✗[/]")
        t.add_row(r.bench, r.case, fmt(r.median, r.unit), f"{fmt(r.lo, r.unit)} – {fmt(r.hi, r.unit)}",
                  str(len(r.samples)), r.target, met)
    return t


def markdown_table(rows: list[Row]) -> str:
    out = ["| benchmark | case | median | min–max | runs | target | met |",
           "|---|---|---:|---:|---:|---|:---:|"]
    for r in rows:
        met = "" if r.met is None else ("✓" if r.met else "✗")
        out.append(f"| {r.bench} | {r.case} | {fmt(r.median, r.unit)} | {fmt(r.lo, r.unit)} – "
                   f"{fmt(r.hi, r.unit)} | {len(r.samples)} | {r.target} | {met} |")
    return "\n".join(out)


def write_results(rows: list[Row], machine: dict[str, Any], out: Path, config: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "results.json"
    p.write_text(json.dumps({"machine": machine, "config": config, "rows": [r.to_json() for r in rows]},
                            indent=1, default=str))
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    return p


def plot(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    series: dict[str, tuple[str, list[Row]]] = {
        "kubegfs capture pause": ("capture pause", []),
        "seed deepcopy+pickle": ("seed capture", []),
        "end-to-end snapshot": ("end-to-end snapshot", []),
        "restore to a new path": ("restore to a new path", []),
        "restore in place": ("restore in place", []),
    }
    for r in rows:
        for _label, (prefix, lst) in series.items():
            if r.case.startswith(prefix) and "files" in r.extra:
                lst.append(r)
    if any(lst for _p, lst in series.values()):
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, (_p, lst) in series.items():
            if not lst:
                continue
            xs = [r.extra["files"] for r in lst]
            if lst[0].unit == "files/s":  # end-to-end: plot seconds
                meds = [statistics.median(r.extra["seconds"]) for r in lst]
                los = [min(r.extra["seconds"]) for r in lst]
                his = [max(r.extra["seconds"]) for r in lst]
            else:
                meds, los, his = [r.median for r in lst], [r.lo for r in lst], [r.hi for r in lst]
            ax.errorbar(xs, meds, yerr=[[m - lo for m, lo in zip(meds, los, strict=True)],
                                        [h - m for m, h in zip(meds, his, strict=True)]],
                        marker="o", capsize=3, label=label)
        ax.axhline(0.010, color="grey", ls=":", lw=1)
        ax.text(0.01, 0.011, "10 ms capture target", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files in the snapshotted directory")
        ax.set_ylabel("seconds (median, min–max bars)")
        ax.set_title("kubegfs snapshot: capture, end-to-end, restore vs the seed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "snapshot_scaling.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    tp = [r for r in rows if r.bench == "throughput"]
    dp = [r for r in rows if r.bench == "datapath"]
    if tp or dp:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for ax, group, ylabel in ((axes[0], tp, "ops/s"), (axes[1], dp, "MB/s")):
            if not group:
                ax.set_visible(False)
                continue
            labels = [r.case.replace(" client threads", " thr").replace(" (100-entry dir)", "") for r in group]
            meds = [r.median for r in group]
            err = [[m - r.lo for m, r in zip(meds, group, strict=True)],
                   [r.hi - m for m, r in zip(meds, group, strict=True)]]
            colors = ["tab:grey" if r.case.startswith("ceiling") else
                      ("tab:green" if r.met else "tab:red") for r in group]
            ax.bar(range(len(group)), meds, yerr=err, capsize=3, color=colors)
            for i, r in enumerate(group):
                lim = _target_value(r)
                if lim is not None:
                    ax.hlines(lim, i - 0.4, i + 0.4, colors="black", linestyles="--")
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_title("metadata throughput (dashed: target)")
        axes[1].set_title("data path vs ceilings (grey) (dashed: target)")
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


def _target_value(r: Row) -> float | None:
    t = r.target.replace(",", "")
    for tok in reversed(t.replace("=", " ").split()):
        try:
            return float(tok.rstrip("/s"))
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------- main


def run(quick: bool, out: Path, only: set[str], sizes: list[int] | None = None,
        console: Any = None) -> list[Row]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console()
    sizes = sizes or ([1_000, 10_000] if quick else [10_000, 100_000, 1_000_000])
    phases = [p for p in ("trees", "capture", "seed", "cluster", "small", "operator", "recovery")
              if p == "trees" or p in only or (p == "cluster" and only & CLUSTER_BENCHES)
              or (p == "small" and only & {"throughput", "datapath"})]
    rows: list[Row] = []
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kubegfs-bench-", dir=out))
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} phases"), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            task = prog.add_task("", total=len(phases))

            def say(msg: str) -> None:
                prog.update(task, description=msg)

            trees: dict[int, Tree] = {}
            if "trees" in phases and (only - {"throughput", "datapath", "operator", "recovery"}):
                say(f"building trees of {', '.join(human_n(n) for n in sizes)} files")
                trees = make_trees(sizes)
            prog.advance(task)
            cap: list[Row] = []
            if "capture" in phases:
                say("capture pause")
                cap = bench_capture(trees, repeats=101 if quick else 201)
                rows += cap
                prog.advance(task)
            if "seed" in phases:
                if not cap:
                    cap = bench_capture(trees, repeats=51)
                say("seed baseline: deepcopy + pickle")
                reps = {n: (3 if n <= 100_000 else 2) for n in sizes}
                rows += bench_seed(trees, cap, reps)
                prog.advance(task)
            if "cluster" in phases:
                big = max(sizes)
                cfg = ClusterCfg(
                    snap_reps={n: (3 if n < big or quick else 3) for n in sizes},
                    restore_reps={n: (3 if n < 1_000_000 else 2) for n in sizes},
                    modify_k=20 if quick else 100, mem_snaps=2 if quick else 3,
                    during_seconds=3.0 if quick else 8.0, during_reps=1 if quick else 2,
                )
                rows += bench_cluster(trees, tmp, cfg, only, say)
                prog.advance(task)
            trees.clear()
            gc.collect()
            if "small" in phases:
                rows += bench_small_cluster(tmp, only, quick, say)
                prog.advance(task)
            if "operator" in phases:
                rows += bench_operator(tmp, quick, say)
                prog.advance(task)
            if "recovery" in phases:
                from .bench_recovery import bench_recovery

                rows += bench_recovery(tmp, quick, say, max(sizes))
                prog.advance(task)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m kubegfs.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI: < 2 minutes)")
    ap.add_argument("--out", default="bench-results", help="directory for results.json and PNG plots")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ALL))
    ap.add_argument("--sizes", default="", help="override the tree sizes (comma-separated file counts)")
    a = ap.parse_args(argv)
    only = {s.strip() for s in a.only.split(",") if s.strip()} or set(ALL)
    bad = only - set(ALL)
    if bad:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(bad))}; choose from {', '.join(ALL)}")
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()] or None
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    out = Path(a.out)
    machine = machine_info()
    t0 = time.perf_counter()
    rows = run(a.quick, out, only, sizes, console)
    wall = time.perf_counter() - t0
    config = {"quick": a.quick, "only": sorted(only), "sizes": sizes, "wall_seconds": round(wall, 1),
              "argv": sys.argv[1:] if argv is None else argv}
    console.print(render_table(rows, machine))
    p = write_results(rows, machine, out, config)
    made = plot(rows, out)
    console.print(f"machine: {machine['cpu']} · {machine['cores']} cores · {machine['ram_gib']} GiB · "
                  f"Python {machine['python']} · {machine['date']} · commit {machine['git_commit']}")
    console.print(f"wrote {p}" + "".join(f", {m}" for m in made) + f" in {wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
