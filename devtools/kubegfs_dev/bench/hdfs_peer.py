"""HDFS as a peer (``--only hdfs``, ``make bench-hdfs``): the same workloads on kubegfs and on an
HDFS MiniDFSCluster in one run, side by side with a ratio column.

HDFS side: ``devtools/hdfs-peer`` (a Maven project depending on
``org.apache.hadoop:hadoop-client-minicluster``), built here with ``mvn -o`` once its
dependencies are in the Maven cache (``~/.cache/kubegfs/m2``, or ``$KUBEGFS_M2``; about 140 MB
on the first build, which is why ``bench-quick`` does not run this), then run under ``nice``.
It prints one JSON object (see ``Main.java``).

Durability of each side, as run:

* kubegfs: the master fsyncs its op log before acknowledging any namespace change; a put's last
  piece of every chunk is fdatasynced by all 3 replicas before it is acknowledged. That is HDFS's
  ``SYNC_BLOCK`` + ``hsync()`` mode (the "HDFS sync" write row), not HDFS's default.
* HDFS: the NameNode's edit log is fsynced before every namespace change is acknowledged
  (``skipFsyncForTesting(false)``). "HDFS default" writes are acknowledged once all 3 DataNodes
  hold the bytes in their page cache (no fsync, ``dfs.datanode.synconclose=false``); "HDFS sync"
  writes use ``CreateFlag.SYNC_BLOCK`` and ``hsync()`` before ``close()``.

Reads, each round on both sides, right after the round's write: first over TCP (kubegfs: a client
with short-circuit reads off, its pieces from the chunkservers' read ports, every block checked by
the client; HDFS: its default TCP block reader from the DataNodes), then short-circuit local reads
(kubegfs: a second client that gets each chunk file's descriptor from its chunkserver's Unix
socket and reads and checks the blocks itself, kubegfs/localread.py; HDFS: the legacy
``BlockReaderLocalLegacy``, which asks the DataNode for the block and checksum files' paths and
reads and verifies them itself; the modern HDFS-347 reader needs libhadoop, which the Maven
artifacts lack). Each side's short-circuit row reports the share of what it read that way
(``short_circuit_fraction``), so a silent fallback to TCP shows. ``--peer data``: the write and
read rows alone.

Both sides: 1 metadata server + 3 data servers on 127.0.0.1, replication 3, each driven by its own
client library with one client per thread (the HDFS clients of one JVM share one RPC connection,
as HDFS clients do). Empty files for creates, stat and ls; 1 KiB rewrites for "changing" files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster import snapshot_e2e, wait_metadata_copies
from .datapath import _Sink
from .report import GiB, MiB, Row, fmt, human_mib, human_n
from .throughput import _threads
from .trees import CHUNK_SIZE, make_trees, state_with

HARNESS = Path(__file__).resolve().parents[2] / "hdfs-peer"


@dataclass
class PeerCfg:
    write_bytes: int
    trees: list[int]
    seconds: float
    reps: int
    modify: int = 100
    metadata: bool = True  # the stat, ls and create rows

    @classmethod
    def for_run(cls, quick: bool, metadata_only: bool = False, data_only: bool = False) -> PeerCfg:
        """``metadata_only`` (``--peer metadata``): the stat, ls and create rows alone, on both
        sides (no write, read or snapshot), to compare code versions in a few minutes;
        ``data_only`` (``--peer data``): the write and read rows alone."""
        cfg = cls(256 * MiB, [10_000], 1.0, 2) if quick else cls(GiB, [10_000, 100_000], 3.0, 3)
        if metadata_only:
            cfg.write_bytes, cfg.trees = 0, []
        if data_only:
            cfg.trees, cfg.metadata = [], False
        return cfg


@dataclass
class Pair:
    """One workload on both sides. ``speed`` is kubegfs speed ÷ HDFS speed (> 1: kubegfs is
    faster), whatever the unit: for seconds it is HDFS time ÷ kubegfs time."""

    case: str
    unit: str
    kubegfs: Row | None
    hdfs: Row
    target: float | None = None  # the speed ratio issues #13/#15 ask for

    @property
    def speed(self) -> float:
        if self.kubegfs is None:
            return float("nan")
        k, h = self.kubegfs.median, self.hdfs.median
        return h / k if self.unit == "s" else k / h


# ---------------------------------------------------------------------- the HDFS side


def _ensure_tools() -> None:
    """Java 17+ and Maven, installed with apt when missing (CI images and fresh machines)."""
    missing = [pkg for tool, pkg in (("java", "openjdk-17-jdk-headless"), ("mvn", "maven"))
               if shutil.which(tool) is None]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing], check=True)


def m2_repo() -> Path:
    return Path(os.environ.get("KUBEGFS_M2", Path.home() / ".cache" / "kubegfs" / "m2"))


def build_harness(say: Callable[[str], None]) -> list[str]:
    """``mvn package`` (offline when the cache has everything); the ``java`` command line."""
    _ensure_tools()
    repo = m2_repo()
    repo.mkdir(parents=True, exist_ok=True)
    mvn = ["nice", "mvn", "-B", "-q", f"-Dmaven.repo.local={repo}", "package"]
    say("building the HDFS peer harness (mvn -o)")
    r = subprocess.run([*mvn[:3], "-o", *mvn[3:]], cwd=HARNESS, capture_output=True, text=True)
    if r.returncode != 0:
        say(f"fetching hadoop-client-minicluster into {repo} (~140 MB, once)")
        r = subprocess.run(mvn, cwd=HARNESS, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mvn package in {HARNESS} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    cp = (HARNESS / "target" / "classpath.txt").read_text().strip()
    jar = HARNESS / "target" / "hdfs-peer-1.jar"
    return ["nice", "java", "-Xmx2g", "-cp", f"{jar}:{cp}", "kubegfs.hdfspeer.Main"]


def run_hdfs(cmd: list[str], base: Path, cfg: PeerCfg, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"HDFS MiniDFSCluster: metadata, {human_mib(cfg.write_bytes)} write/read, snapshots of "
        f"{', '.join(human_n(n) for n in cfg.trees)} files")
    args = ["--base", str(base), "--write-mib", str(cfg.write_bytes // MiB),
            "--trees", ",".join(map(str, cfg.trees)), "--seconds", str(cfg.seconds),
            "--reps", str(cfg.reps), "--modify", str(cfg.modify), "--metadata", "1" if cfg.metadata else "0"]
    try:
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=3600)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"HDFS peer harness exited {r.returncode}:\n{r.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------- the kubegfs side


def _distinct_files(client: Any, root: str, samples: list[str], k: int) -> list[str]:
    """k distinct file paths under root, from the leaf directories of the tree's samples."""
    out: list[str] = []
    for s in samples:
        parent = f"{root}/{s.rsplit('/', 1)[0]}"
        out += [e["path"] for e in client.ls(parent) if e["type"] == "file" and e["path"] not in out]
        if len(out) >= k:
            break
    return out[:k]


def bench_kubegfs(tmp: Path, cfg: PeerCfg, say: Callable[[str], None]) -> dict[str, Row]:
    """The HDFS harness's workloads on a master + 3 chunkservers (RF=3) whose master recovered
    the snapshot trees from a checkpoint written offline."""
    from kubegfs.local import LocalCluster
    from kubegfs.master.oplog import write_checkpoint

    rows: dict[str, Row] = {}
    data = tmp / "peer"
    trees = make_trees(cfg.trees)
    (data / "master").mkdir(parents=True, exist_ok=True)
    write_checkpoint(data / "master", state_with(trees).checkpoint_view())
    cluster = LocalCluster(data, n_chunkservers=3, chunk_size=CHUNK_SIZE, replication=3)
    clients: list[Any] = []
    try:
        say("kubegfs: master + 3 chunkservers")
        cluster.start_master(timeout=600)
        for p in cluster.chunkservers:
            cluster.start_chunkserver(p, wait=False)
        cluster.wait_registered(3, 120)
        clients = [cluster.client(short_circuit=False) for _ in range(4)]
        c0 = clients[0]
        c0.mkdir("/st")
        for i in range(100):
            c0.put(f"/st/f{i}", b"")
        for nt in (1, 4) if cfg.metadata else ():
            rates: dict[str, list[float]] = {"stat": [], "ls": [], "create": []}
            for r in range(cfg.reps):
                say(f"kubegfs: stat / ls / creates, {nt} threads ({r + 1}/{cfg.reps})")

                def stat(i: int, deadline: float) -> int:
                    rnd, k = random.Random(i), 0
                    while time.monotonic() < deadline:
                        clients[i].stat(f"/st/f{rnd.randrange(100)}")
                        k += 1
                    return k

                def ls(i: int, deadline: float) -> int:
                    k = 0
                    while time.monotonic() < deadline:
                        if len(clients[i].ls("/st")) != 100:
                            raise RuntimeError("ls /st: expected 100 entries")
                        k += 1
                    return k

                base = f"/cr{nt}-{r}"
                c0.mkdir(base)

                def create(i: int, deadline: float, base: str = base) -> int:
                    k = 0
                    while time.monotonic() < deadline:
                        clients[i].put(f"{base}/w{i}-{k}", b"", overwrite=False)
                        k += 1
                    return k

                for name, fn in (("stat", stat), ("ls", ls), ("create", create)):
                    rates[name].append(_threads(nt, fn, cfg.seconds))
            for name, samples in rates.items():
                rows[f"{name}/{nt}"] = Row("hdfs-peer", f"{name}, {nt} threads: kubegfs", "ops/s", samples)
        if cfg.write_bytes:
            local = cluster.client(short_circuit=True)
            clients.append(local)
            rows.update(_kubegfs_data(c0, local, cfg, say))
        wait_metadata_copies(c0)  # (long since, after the rates above)
        for n, t in trees.items():
            say(f"kubegfs: snapshots of {human_n(n)} files")
            first, _ = snapshot_e2e(c0, f"/t{n}", f"peer-{n}-0")
            files = _distinct_files(c0, f"/t{n}", t.sample_files, cfg.modify * cfg.reps)
            snaps, diffs = [], []
            for r in range(cfg.reps):
                for f in files[r * cfg.modify:(r + 1) * cfg.modify]:
                    c0.put(f, b"m" * 1024)
                t0 = time.perf_counter()  # long-polled to Ready, as createSnapshot returns when done
                c0.snapshot_create(f"/t{n}", f"peer-{n}-{r + 1}")
                snaps.append(time.perf_counter() - t0)
                t0 = time.perf_counter()  # as getSnapshotDiffReport: consecutive snapshots
                c0.snapshot_diff(f"peer-{n}-{r}", f"peer-{n}-{r + 1}")
                diffs.append(time.perf_counter() - t0)
            rows[f"diff/{n}"] = Row("hdfs-peer", f"snapshot diff, {human_n(n)}: kubegfs", "s", diffs)
            rows[f"snapshot_first/{n}"] = Row("hdfs-peer", f"first snapshot, {human_n(n)}: kubegfs", "s", [first])
            rows[f"snapshot/{n}"] = Row("hdfs-peer", f"snapshot after {cfg.modify} changed, "
                                        f"{human_n(n)}: kubegfs", "s", snaps)
    finally:
        for c in clients:
            c.close()
        cluster.stop()
        shutil.rmtree(data, ignore_errors=True)
    return rows


def _kubegfs_data(client: Any, local: Any, cfg: PeerCfg, say: Callable[[str], None]) -> dict[str, Row]:
    """Puts and gets by ``client`` (over TCP), then a get by ``local`` (short-circuit local reads:
    kubegfs/localread.py) in each round, as the HDFS side reads over TCP, then short-circuit."""
    block = os.urandom(4 * MiB)

    def pieces() -> Iterator[bytes]:
        for i in range(cfg.write_bytes // len(block)):
            yield bytes([i & 0xFF]) + block[1:]  # every piece differs, as on the HDFS side

    puts: list[float] = []
    gets: dict[Any, list[float]] = {client: [], local: []}
    for r in range(cfg.reps):
        say(f"kubegfs: put / get / short-circuit get {human_mib(cfg.write_bytes)} at RF=3 ({r + 1}/{cfg.reps})")
        t0 = time.perf_counter()
        client.put("/big.bin", pieces())
        puts.append(cfg.write_bytes / (time.perf_counter() - t0) / 1e6)
        for c, samples in gets.items():
            sink = _Sink()
            t0 = time.perf_counter()
            c.get_to("/big.bin", sink)
            samples.append(sink.n / (time.perf_counter() - t0) / 1e6)
    size = human_mib(cfg.write_bytes)
    put = Row("hdfs-peer", f"write {size}: kubegfs", "MB/s", puts)
    from kubegfs.client import PIECE

    st = local.stats  # its pieces: the first from each replica goes to that replica's main port, which names its socket
    frac = st.short_circuit / (cfg.reps * -(-cfg.write_bytes // PIECE))
    return {"write_default": put, "write_sync": put,
            "read": Row("hdfs-peer", f"read {size}: kubegfs", "MB/s", gets[client]),
            "read_sc": Row("hdfs-peer", f"read {size} short-circuit: kubegfs", "MB/s", gets[local],
                           extra={"short_circuit_pieces": st.short_circuit, "fallbacks": st.short_circuit_fallbacks,
                                  "short_circuit_fraction": round(frac, 4)})}


# ---------------------------------------------------------------------- pairing and tables

_TARGETS = {"stat": 1.0, "ls": 1.0, "create": 1.5, "write_default": 0.8, "write_sync": 1.0,
            "read": 1.0, "read_sc": 1.0, "snapshot": 0.2}


def _label(hid: str, cfg: PeerCfg) -> str:
    kind, _, arg = hid.partition("/")
    size = human_mib(cfg.write_bytes)
    return {
        "stat": f"stat of a random file, {arg} thread{'s' if arg != '1' else ''}",
        "ls": f"ls of a 100-entry dir, {arg} thread{'s' if arg != '1' else ''}",
        "create": f"durable creates of empty files, {arg} thread{'s' if arg != '1' else ''}",
        "write_default": f"write {size} at RF=3 vs HDFS default (no fsync)",
        "write_sync": f"write {size} at RF=3 vs HDFS SYNC_BLOCK + hsync",
        "read": f"read {size} (page cache warm), over TCP on both sides",
        "read_sc": f"read {size} (page cache warm), short-circuit local reads on both sides",
        "snapshot_first": f"first snapshot of {human_n(int(arg or 0))} files (kubegfs: to Ready)",
        "snapshot": f"snapshot after {cfg.modify} changed, {human_n(int(arg or 0))} files (kubegfs: to Ready)",
        "diff": f"snapshot diff, {human_n(int(arg or 0))} files, {cfg.modify} changed",
    }.get(kind, hid)


def pair_up(kube: dict[str, Row], hdfs: dict[str, Any], cfg: PeerCfg) -> list[Pair]:
    pairs = []
    for h in hdfs["rows"]:
        hid: str = h["id"]
        case = _label(hid, cfg)
        extra = {k: v for k, v in h.items() if k not in ("id", "unit", "samples")}
        hrow = Row("hdfs-peer", f"{case}: HDFS", h["unit"], list(h["samples"]), extra=extra)
        pairs.append(Pair(case, h["unit"], kube.get(hid), hrow, _TARGETS.get(hid.split("/")[0])))
    return pairs


def ratio_rows(pairs: list[Pair]) -> list[Row]:
    """For results.json and the main table: one speed-ratio row per workload, both sides'
    samples in its ``extra``."""
    rows: list[Row] = []
    for p in pairs:
        if p.kubegfs is None:
            continue
        r = Row("hdfs-peer", f"{p.case}: kubegfs ÷ HDFS speed", "x", [p.speed],
                extra={"unit": p.unit, "kubegfs": p.kubegfs.samples, "hdfs": p.hdfs.samples, **p.hdfs.extra,
                       **({"kubegfs_extra": p.kubegfs.extra} if p.kubegfs.extra else {})})
        if p.target is not None:
            r.target, r.met = f"≥ {p.target:g}×", p.speed >= p.target
        rows.append(r)
    return rows


def _cells(p: Pair) -> tuple[str, str, str, str]:
    k = fmt(p.kubegfs.median, p.unit) if p.kubegfs else "—"
    ratio = "—" if p.kubegfs is None else f"{p.speed:.2f}" if p.speed >= 0.1 else f"{p.speed:.2g}"
    target = "" if p.target is None or p.kubegfs is None else (
        f"≥ {p.target:g} {'✓' if p.speed >= p.target else '✗'}")
    return k, fmt(p.hdfs.median, p.unit), ratio, target


def render_peer_table(pairs: list[Pair], hdfs: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"kubegfs vs HDFS {hdfs.get('hadoop_version', '?')} MiniDFSCluster (same machine, same run; "
                    "ratio = kubegfs speed ÷ HDFS speed, > 1: kubegfs faster)")
    t.add_column("workload")
    for col in ("kubegfs", "HDFS", "ratio"):
        t.add_column(col, justify="right")
    t.add_column("target (#13/#15)")
    for p in pairs:
        t.add_row(p.case, *_cells(p))
    return t


def markdown_peer_table(pairs: list[Pair]) -> str:
    out = ["| workload | kubegfs | HDFS | kubegfs ÷ HDFS speed | target (#13/#15) |",
           "|---|---:|---:|---:|---|"]
    out += [f"| {p.case} | " + " | ".join(_cells(p)) + " |" for p in pairs]
    return "\n".join(out)


def bench_hdfs_peer(tmp: Path, out: Path, quick: bool, say: Callable[[str], None], metadata_only: bool = False,
                    data_only: bool = False) -> tuple[list[Pair], dict[str, Any]]:
    """Build and run the HDFS harness, then the same workloads on kubegfs (one after the other,
    never at the same time: the machine is shared). Writes DIR/hdfs-peer.{json,md}."""
    cfg = PeerCfg.for_run(quick, metadata_only, data_only)
    cmd = build_harness(say)
    hdfs = run_hdfs(cmd, tmp / "hdfs", cfg, say)
    kube = bench_kubegfs(tmp, cfg, say)
    pairs = pair_up(kube, hdfs, cfg)
    (out / "hdfs-peer.json").write_text(json.dumps(hdfs, indent=1))
    (out / "hdfs-peer.md").write_text(markdown_peer_table(pairs) + "\n")
    return pairs, hdfs
