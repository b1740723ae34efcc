"""Interleaved A/B of durable creates across code versions and metadata replication modes:

    python -m kubegfs_dev.bench.abcreates off=off main=sync@main new=sync [--rounds 8]

Each ``LABEL=MODE[/COPIES][@REV]`` is a cluster (master + 3 chunkservers) started side by side
with the others: ``--metadata-replication MODE`` (``--metadata-copies COPIES``), running this
tree's ``kubegfs`` or, with ``@REV``, the one ``git archive REV`` holds. Every round measures
each cluster in turn (``mkdir`` over raw keep-alive HTTP from ``--connections`` connections, or
with ``--client`` empty-file creates through this tree's client library, one ``Client`` per
connection: ``Client.put(path, b"", overwrite=False)``, the HDFS peer's create row),
so a ratio taken within a round holds on a machine whose load drifts; it prints each round's
rates and the master's and chunkservers' CPU per create (psutil), then per label the median
rate, and the median of the per-round ratios against the first label and between the others.
Run it under ``flock /tmp/kubegfs-bench.lock`` like any benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil

from kubegfs.local import LocalCluster

from .recovery import _in_sync, _mkdir, _wait
from .throughput import RawHTTP, _raw_worker, _threads
from .trees import CHUNK_SIZE

ROOT = Path(__file__).resolve().parents[3]  # the checkout: kubegfs/ and devtools/


@dataclass
class Arm:
    label: str
    mode: str
    copies: int
    rev: str
    rates: list[float] = field(default_factory=list)
    master_us: list[float] = field(default_factory=list)
    chunkservers_us: list[float] = field(default_factory=list)


def parse_arm(spec: str) -> Arm:
    label, sep, rest = spec.partition("=")
    rest, _, rev = rest.partition("@")
    mode, _, copies = rest.partition("/")
    if not sep or not label or mode not in ("off", "sync", "async") or (copies and not copies.isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected LABEL=off|sync|async[/COPIES][@REV]")
    return Arm(label, mode, int(copies or 2), rev)


def source_tree(rev: str, into: Path) -> Path:
    """A directory whose ``kubegfs`` package is the one at ``rev``."""
    out = into / f"src-{rev.replace('/', '_')}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kubegfs"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _client_worker(cl: LocalCluster, base: str) -> Callable[[int, float], int]:
    """A :func:`_threads` worker: empty-file creates through a ``Client`` of its own."""

    def work(i: int, deadline: float) -> int:
        with cl.client() as c:
            k = 0
            while time.monotonic() < deadline:
                c.put(f"{base}/w{i}-{k}", b"", overwrite=False)
                k += 1
        return k

    return work


def measure(cl: LocalCluster, arm: Arm, base: str, connections: int, seconds: float, client: bool = False) -> None:
    RawHTTP(cl.master.host, cl.master.port, cl.token).call("POST", "/api/v1/fs/mkdir", {"path": base})
    assert cl.master.popen is not None
    master = psutil.Process(cl.master.popen.pid)
    chunkservers = [psutil.Process(p.popen.pid) for p in cl.chunkservers if p.popen is not None]

    def cpu(procs: list[psutil.Process]) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    m0, c0 = cpu([master]), cpu(chunkservers)
    t0 = time.perf_counter()
    work = _client_worker(cl, base) if client else _raw_worker(cl, partial(_mkdir, base))
    rate = _threads(connections, work, seconds)
    n = rate * (time.perf_counter() - t0)
    arm.rates.append(rate)
    arm.master_us.append((cpu([master]) - m0) / n * 1e6)
    arm.chunkservers_us.append((cpu(chunkservers) - c0) / n * 1e6)


def ratios(a: Arm, b: Arm) -> str:
    r = [x / y for x, y in zip(a.rates, b.rates, strict=True)]
    return (f"{a.label}/{b.label} {statistics.median(r):.3f} (min {min(r):.3f}, max {max(r):.3f}; "
            f"{sum(x > 1 for x in r)}/{len(r)} rounds above 1, {sum(x >= 0.75 for x in r)}/{len(r)} at 0.75 or more)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("arms", nargs="+", type=parse_arm, metavar="LABEL=MODE[/COPIES][@REV]")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--client", action="store_true",
                    help="empty-file creates through the client library instead of mkdir over raw HTTP")
    args = ap.parse_args()
    arms: list[Arm] = args.arms
    tmp = Path(tempfile.mkdtemp(prefix="kubegfs-ab-"))
    clusters: list[LocalCluster] = []
    saved_path, saved_cwd = os.environ.get("PYTHONPATH", ""), os.getcwd()
    try:
        os.chdir(tmp)  # ``python -m kubegfs`` puts its working directory first on sys.path
        for arm in arms:
            src = source_tree(arm.rev, tmp) if arm.rev else ROOT
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), saved_path) if p)
            cl = LocalCluster(tmp / arm.label, 3, chunk_size=CHUNK_SIZE)
            cl.master_args = ["--metadata-replication", arm.mode, "--metadata-copies", str(arm.copies)]
            cl.start()
            clusters.append(cl)
            if arm.mode != "off":
                _wait(partial(_in_sync, cl, arm.copies), 60, f"the metadata copies of {arm.label}")
        os.environ["PYTHONPATH"] = saved_path
        loads = []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for arm, cl in zip(arms, clusters, strict=True):
                measure(cl, arm, f"/ab{r}", args.connections, args.seconds, args.client)
            print(f"round {r + 1} (load {loads[-1]:.2f}): " + "  ".join(
                f"{a.label} {a.rates[-1]:,.0f}/s master {a.master_us[-1]:.0f} µs chunkservers "
                f"{a.chunkservers_us[-1]:.0f} µs" for a in arms), flush=True)
        print(f"load average {min(loads):.2f}-{max(loads):.2f}, {args.connections} connections")
        for arm in arms:
            print(f"{arm.label}: {statistics.median(arm.rates):,.0f}/s, CPU per create: master "
                  f"{statistics.median(arm.master_us):.0f} µs, chunkservers {statistics.median(arm.chunkservers_us):.0f} µs")
        for i, a in enumerate(arms[1:], 1):
            print(ratios(a, arms[0]))
            for b in arms[1:i]:
                print(ratios(a, b))
        for arm, cl in zip(arms, clusters, strict=True):
            if arm.mode != "off" and not _in_sync(cl, arm.copies):
                print(f"warning: the metadata copies of {arm.label} fell out of sync")
    finally:
        os.environ["PYTHONPATH"] = saved_path
        os.chdir(saved_cwd)
        for cl in clusters:
            cl.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
