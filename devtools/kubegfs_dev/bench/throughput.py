"""Metadata throughput on a small cluster: durable creates, stat and ls from 1–16 client
threads, and over bare keep-alive HTTP (``throughput``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from .report import Row, at_least


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


def _raw_worker(cluster: Any, request: Callable[[int, int], tuple[str, str, dict[str, Any] | None]]
                ) -> Callable[[int, float], int]:
    """A :func:`_threads` worker: its own :class:`RawHTTP` connection, sending
    ``request(thread, k)`` (method, path, JSON body) for k = 0, 1, ... until the deadline."""

    def work(i: int, deadline: float) -> int:
        conn = RawHTTP(cluster.master.host, cluster.master.port, cluster.token)
        k = 0
        try:
            while time.monotonic() < deadline:
                conn.call(*request(i, k))
                k += 1
        finally:
            conn.close()
        return k

    return work


def cpu_per_op(cluster: Any, fn: Callable[[int], object], seconds: float) -> float:
    """CPU seconds per call of ``fn(k)`` from one thread, the master's and this (client)
    process's together (psutil ``cpu_times``): less sensitive to a busy machine than a rate."""
    import psutil

    procs = [psutil.Process(cluster.master.popen.pid), psutil.Process()]

    def cpu() -> float:
        return float(sum(t.user + t.system for t in (p.cpu_times() for p in procs)))

    c0, k = cpu(), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fn(k)
        k += 1
    return float(cpu() - c0) / max(k, 1)


def bench_cpu_per_op(cluster: Any, seconds: float, reps: int, say: Callable[[str], None]) -> list[Row]:
    """Master + client CPU per durable empty-file create, stat and 100-entry ls (1 thread)."""
    c = cluster.client()
    try:
        c.mkdir("/cpu")
        c.mkdir("/cpu-new")  # the creates go elsewhere, so the ls lists 100 entries, not every create
        for i in range(100):
            c.put(f"/cpu/f{i}", b"")
        ops: dict[str, Callable[[int], object]] = {
            "durable empty-file create": lambda k: c.put(f"/cpu-new/n{time.monotonic_ns()}-{k}", b"", overwrite=False),
            "stat": lambda k: c.stat(f"/cpu/f{k % 100}"),
            "ls (100 entries)": lambda k: c.ls("/cpu"),
        }
        rows = []
        for name, fn in ops.items():
            say(f"CPU per {name}")
            samples = [cpu_per_op(cluster, fn, seconds) for _ in range(reps)]
            rows.append(Row("throughput", f"CPU per {name}, master + client", "s", samples))
        return rows
    finally:
        c.close()


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

                def mkdir(i: int, k: int, base: str = base) -> tuple[str, str, dict[str, Any] | None]:
                    return "POST", "/api/v1/fs/mkdir", {"path": f"{base}/w{i}-{k}"}

                rates.append(_threads(nt, _raw_worker(cluster, mkdir), seconds))
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

            def stat(i: int, k: int) -> tuple[str, str, dict[str, Any] | None]:
                return "GET", f"/api/v1/fs/stat?path=/st/e{k % 100}", None

            rates.append(_threads(4, _raw_worker(cluster, stat), seconds))
        rows.append(at_least(Row("throughput", "stat, raw HTTP, 4 connections", "ops/s", rates,
                                 extra={"threads": 4, "client": "http.client"}), 5000, "≥ 5,000/s"))
    finally:
        for c in clients:
            c.close()
    return rows
