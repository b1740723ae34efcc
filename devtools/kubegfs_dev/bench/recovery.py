"""The ``recovery`` benchmark (``python -m kubegfs_dev.bench --only recovery``):

* durable creates/s with the metadata replicated ``sync`` / ``async`` vs local only (``off``),
  measured on three clusters side by side, one mode after the other in every round, so the
  ratio holds on a noisy machine (target: sync ≥ 0.75× local only); a fourth cluster runs
  ``sync`` with its chunkservers' data directories on tmpfs (``/dev/shm``, when there is one):
  not a durable setup, it shows what the copies cost when their fdatasyncs do not queue on the
  master's disk, as they do not on real nodes;
* ``kubegfs master recover`` of an N-file namespace from the chunkservers' metadata copies, after
  the master's data directory was deleted (target for 1M files: ≤ 10 s).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import requests

from kubegfs.local import LocalCluster
from kubegfs.master.oplog import write_checkpoint

from .report import Row, at_least, at_most, human_n
from .throughput import RawHTTP, _raw_worker, _threads
from .trees import CHUNK_SIZE, make_trees, state_with

MODES = ("off", "sync", "async")
SHM = Path("/dev/shm")


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _status(cl: LocalCluster) -> dict[str, Any]:
    r = requests.get(cl.master_url + "/api/v1/status", headers={"Authorization": f"Bearer {cl.token}"}, timeout=30)
    body: dict[str, Any] = r.json()
    return body


def _in_sync(cl: LocalCluster, n: int = 2) -> bool:
    try:
        return int(_status(cl)["metadata_replication"]["in_sync"]) >= n
    except (requests.RequestException, KeyError, ValueError):
        return False


def _mkdir(base: str, i: int, k: int) -> tuple[str, str, dict[str, Any] | None]:
    return "POST", "/api/v1/fs/mkdir", {"path": f"{base}/w{i}-{k}"}


def bench_recovery(tmp: Path, quick: bool, say: Callable[[str], None], files: int) -> list[Row]:
    return bench_creates(tmp, quick, say) + bench_recover(tmp, files, say)


def bench_creates(tmp: Path, quick: bool, say: Callable[[str], None]) -> list[Row]:
    seconds, reps, threads = (1.0, 2, 16) if quick else (3.0, 5, 16)
    clusters: dict[str, LocalCluster] = {}
    kinds = [*MODES, *(["sync-tmpfs"] if SHM.is_dir() else [])]
    rates: dict[str, list[float]] = {m: [] for m in kinds}
    single: dict[str, list[float]] = {m: [] for m in kinds}
    shm = Path(tempfile.mkdtemp(prefix="kubegfs-bench-", dir=SHM)) if SHM.is_dir() else None
    try:
        for kind in kinds:
            mode = kind.removesuffix("-tmpfs")
            say(f"recovery: starting a cluster with metadata replication {kind}")
            cl = LocalCluster(tmp / f"meta-{kind}", 3, chunk_size=CHUNK_SIZE)
            cl.master_args = ["--metadata-replication", mode]
            if kind.endswith("-tmpfs") and shm is not None:
                for p in cl.chunkservers:  # the copies' fdatasyncs off the master's disk
                    (shm / p.name).mkdir()
                    p.data.parent.mkdir(parents=True, exist_ok=True)
                    p.data.symlink_to(shm / p.name)
            clusters[kind] = cl
            cl.start()
            if mode != "off":
                _wait(partial(_in_sync, cl), 60, f"metadata copies ({kind})")
        for r in range(reps):
            for mode, cl in clusters.items():
                say(f"recovery: durable creates, metadata {mode} ({r + 1}/{reps})")
                base = f"/c{r}"
                RawHTTP(cl.master.host, cl.master.port, cl.token).call("POST", "/api/v1/fs/mkdir", {"path": base})
                rates[mode].append(_threads(threads, _raw_worker(cl, partial(_mkdir, base)), seconds))
                base = f"/c{r}-single"
                RawHTTP(cl.master.host, cl.master.port, cl.token).call("POST", "/api/v1/fs/mkdir", {"path": base})
                single[mode].append(_threads(1, _raw_worker(cl, partial(_mkdir, base)), seconds / 2))
        for kind in kinds[1:]:
            if not _in_sync(clusters[kind]):
                raise RuntimeError(f"metadata copies fell out of sync during the {kind} run")
    finally:
        for cl in clusters.values():
            cl.stop()
            shutil.rmtree(cl.data_dir, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    rows = [Row("recovery", f"durable creates, metadata {m}, {threads} connections", "ops/s", rates[m],
                extra={"mode": m, "threads": threads}) for m in kinds]
    rows += [Row("recovery", f"durable creates, metadata {m}, 1 connection", "ops/s", single[m],
                 extra={"mode": m, "threads": 1}) for m in kinds]
    ratio = [s / o for s, o in zip(rates["sync"], rates["off"], strict=True)]
    rows.append(at_least(Row("recovery", f"sync / local-only durable creates, {threads} connections", "x", ratio),
                         0.75, "≥ 0.75×"))
    ratio1 = [s / o for s, o in zip(single["sync"], single["off"], strict=True)]
    rows.append(Row("recovery", "sync / local-only durable creates, 1 connection", "x", ratio1))
    if "sync-tmpfs" in rates:  # not the target: the part of the cost that is this one shared disk
        for n, got in ((threads, rates), (1, single)):
            rows.append(Row("recovery", f"sync with the copies on tmpfs / local-only, {n} connection"
                            f"{'s' if n > 1 else ''}", "x",
                            [s / o for s, o in zip(got["sync-tmpfs"], got["off"], strict=True)]))
    return rows


def bench_recover(tmp: Path, files: int, say: Callable[[str], None]) -> list[Row]:
    say(f"recovery: building a {human_n(files)}-file namespace")
    trees = make_trees([files])
    data = tmp / "recover"
    (data / "master").mkdir(parents=True)
    write_checkpoint(data / "master", state_with(trees).checkpoint_view())
    trees.clear()
    cl = LocalCluster(data, 3, chunk_size=CHUNK_SIZE)
    try:
        say("recovery: starting the master, waiting for its metadata copies")
        cl.start(timeout=600)
        _wait(lambda: _in_sync(cl), 600, "metadata copies")
        cl.kill(cl.master, signal.SIGKILL)
        shutil.rmtree(cl.master.data)
        cl.start_master()
        _wait(lambda: len(_status(cl)["cluster"]["foreign_chunkservers"]) == 3, 60, "the chunkservers to be refused")
        say(f"recovery: master recover of {human_n(files)} files")
        assert cl.master.popen is not None
        proc = psutil.Process(cl.master.popen.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        r = requests.post(cl.master_url + "/api/v1/admin/recover", json={},
                          headers={"Authorization": f"Bearer {cl.token}"}, timeout=900)
        seconds = time.perf_counter() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0  # the machine's load does not inflate this one
        body = r.json()
        if r.status_code != 200 or body.get("files") != files:
            raise RuntimeError(f"recover failed: {r.status_code} {body}")
    finally:
        cl.stop()
        shutil.rmtree(data, ignore_errors=True)
    extra = {"files": files, "replay_seconds": body.get("replay_seconds"), "seq": body.get("seq"),
             "master_cpu_seconds": cpu}
    row = Row("recovery", f"master recover from metadata copies, {human_n(files)} files", "s", [seconds],
              extra=extra)
    cpu_row = Row("recovery", f"master recover, {human_n(files)} files: master CPU time", "s", [cpu], extra=extra)
    return [at_most(row, 10.0, "≤ 10 s") if files >= 1_000_000 else row, cpu_row]
