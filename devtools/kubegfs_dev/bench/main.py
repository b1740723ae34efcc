"""The benchmark runner behind ``python -m kubegfs_dev.bench``: which phases run, progress, and
the command line."""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import ALL, CLUSTER_BENCHES, OPT_IN
from .cluster import ClusterCfg, bench_cluster
from .datapath import bench_small_cluster
from .hdfs_peer import bench_hdfs_peer, ratio_rows, render_peer_table
from .inprocess import bench_capture, bench_incremental, bench_seed
from .operator_e2e import bench_operator
from .pods import bench_pods
from .recovery import bench_recovery
from .report import Row, human_n, machine_info, plot, render_table, write_results
from .trees import Tree, make_trees


def run(quick: bool, out: Path, only: set[str], sizes: list[int] | None = None,
        console: Any = None, peer: str = "all") -> list[Row]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console()
    sizes = sizes or ([1_000, 10_000] if quick else [10_000, 100_000, 1_000_000])
    phases = [p for p in ("trees", "capture", "seed", "incremental", "cluster", "small", "operator", "recovery", "hdfs", "pods")
              if p == "trees" or p in only or (p == "cluster" and only & CLUSTER_BENCHES)
              or (p == "small" and only & {"throughput", "datapath"})]
    rows: list[Row] = []
    peer_table = None
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
            if "trees" in phases and (only - {"throughput", "datapath", "operator", "recovery", "hdfs", "pods"}):
                say(f"building trees of {', '.join(human_n(n) for n in sizes)} files")
                trees = make_trees(sizes)
            prog.advance(task)
            cap: list[Row] = []
            if "capture" in phases:
                say("capture pause")
                cap = bench_capture(trees, repeats=101 if quick else 201)
                rows += cap
                prog.advance(task)
            if "incremental" in phases:
                say("incremental snapshot, diff and restore: the master's work, in process")
                rows += bench_incremental(trees)
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
                rows += bench_recovery(tmp, quick, say, max(sizes))
                prog.advance(task)
            if "hdfs" in phases:
                pairs, hdfs = bench_hdfs_peer(tmp, out, quick, say, peer == "metadata", peer == "data")
                rows += ratio_rows(pairs)
                peer_table = render_peer_table(pairs, hdfs)
                prog.advance(task)
            if "pods" in phases:
                rows += bench_pods(tmp, say)
                prog.advance(task)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if peer_table is not None:
        console.print(peer_table)
    return rows


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m kubegfs_dev.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI: < 2 minutes)")
    ap.add_argument("--out", default="bench-results", help="directory for results.json and PNG plots")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ALL + OPT_IN))
    ap.add_argument("--hdfs", action="store_true",
                    help="also run the HDFS MiniDFSCluster peer (Java 17 + Maven; ~140 MB fetched once)")
    ap.add_argument("--sizes", default="", help="override the tree sizes (comma-separated file counts)")
    ap.add_argument("--peer", choices=("all", "metadata", "data"), default="all",
                    help="the HDFS peer's workloads: all, metadata (stat, ls and creates only, both sides) "
                    "or data (writes and reads only)")
    a = ap.parse_args(argv)
    only = ({s.strip() for s in a.only.split(",") if s.strip()} or set(ALL)) | ({"hdfs"} if a.hdfs else set())
    bad = only - set(ALL + OPT_IN)
    if bad:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(bad))}; choose from {', '.join(ALL + OPT_IN)}")
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()] or None
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    out = Path(a.out)
    machine = machine_info()
    t0 = time.perf_counter()
    rows = run(a.quick, out, only, sizes, console, a.peer)
    wall = time.perf_counter() - t0
    config = {"quick": a.quick, "only": sorted(only), "sizes": sizes, "peer": a.peer, "wall_seconds": round(wall, 1),
              "argv": sys.argv[1:] if argv is None else argv}
    console.print(render_table(rows, machine))
    p = write_results(rows, machine, out, config)
    made = plot(rows, out)
    console.print(f"machine: {machine['cpu']} · {machine['cores']} cores · {machine['ram_gib']} GiB · "
                  f"Python {machine['python']} · {machine['date']} · commit {machine['git_commit']}")
    console.print(f"wrote {p}" + "".join(f", {m}" for m in made) + f" in {wall:.1f}s")
    return 0

