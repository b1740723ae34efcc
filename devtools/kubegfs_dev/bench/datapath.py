"""The data path on a small cluster: 1 GiB put/get at RF=3 against the machine's disk and
loopback ceilings measured in the same run (``datapath``), and the small cluster both this and
the throughput benchmark run on."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .report import GiB, MiB, Row, at_least, human_mib
from .throughput import bench_cpu_per_op, bench_throughput
from .trees import CHUNK_SIZE


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

    c = cluster.client(short_circuit=False)
    local = cluster.client(short_circuit=True)  # every chunkserver is on this host
    puts: list[float] = []
    gets: list[float] = []
    local_gets: list[float] = []

    def get(client: Any, into: list[float]) -> None:
        sink = _Sink()
        t0 = time.perf_counter()
        client.get_to("/big.bin", sink)
        into.append(sink.n / (time.perf_counter() - t0) / 1e6)

    try:
        for r in range(reps):
            say(f"put {size // MiB} MiB at RF=3 ({r + 1}/{reps})")
            t0 = time.perf_counter()
            c.put("/big.bin", pieces())
            puts.append(size / (time.perf_counter() - t0) / 1e6)
            say(f"get {size // MiB} MiB over TCP, then short-circuit ({r + 1}/{reps})")
            get(c, gets)
            get(local, local_gets)
    finally:
        c.close()
        local.close()
    if local.stats.short_circuit == 0:  # (a data dir whose socket path is too long: the socket is off)
        say("warning: the short-circuit get read nothing short-circuit; its row is a TCP read")
    d = statistics.median(disk)
    return [
        Row("datapath", "ceiling: sequential write + fdatasync", "MB/s", disk,
            extra={"bytes": max(size, 256 * MiB)}),
        Row("datapath", "ceiling: loopback TCP copy", "MB/s", loop, extra={"bytes": 2 * size}),
        at_least(Row("datapath", f"put {human_mib(size)} at RF=3", "MB/s", puts, extra={"bytes": size}),
                 0.8 * d / 3, f"≥ 0.8×disk/3 = {0.8 * d / 3:,.0f}"),
        at_least(Row("datapath", f"get {human_mib(size)} over TCP", "MB/s", gets, extra={"bytes": size}),
                 500, "≥ 500 MB/s"),
        Row("datapath", f"get {human_mib(size)} short-circuit (local)", "MB/s", local_gets,
            extra={"bytes": size, "short_circuit_pieces": local.stats.short_circuit,
                   "fallbacks": local.stats.short_circuit_fallbacks}),
    ]


def bench_small_cluster(tmp: Path, want: set[str], quick: bool, say: Callable[[str], None]) -> list[Row]:
    from kubegfs.local import LocalCluster

    rows: list[Row] = []
    cluster = LocalCluster(tmp / "small", n_chunkservers=3, chunk_size=CHUNK_SIZE, replication=3)
    try:
        say("starting a master + 3 chunkservers")
        cluster.start()
        if "throughput" in want:
            rows += bench_throughput(cluster, 1.0 if quick else 3.0, 2 if quick else 3, say)
            rows += bench_cpu_per_op(cluster, 1.0 if quick else 3.0, 2 if quick else 3, say)
        if "datapath" in want:
            rows += bench_datapath(cluster, 64 * MiB if quick else GiB, 2 if quick else 3, say)
    finally:
        cluster.stop()
        shutil.rmtree(tmp / "small", ignore_errors=True)
    return rows
