"""A whole kubegfs on this machine: a master and N chunkservers as child processes on distinct
loopback addresses (127.0.1.1, 127.0.2.1, …), spread over simulated zones and regions. Used by
``kubegfs local up``, the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from .client import Client

ZONES = ["zone-a", "zone-b", "zone-c"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def signal_group(popen: subprocess.Popen[bytes], sig: int, timeout: float = 10.0) -> None:
    """Send ``sig`` to a child's process group and reap it (SIGKILL if it lingers)."""
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


@dataclass
class Proc:
    name: str
    host: str
    port: int
    data: Path
    node: str = ""
    zone: str = ""
    region: str = ""
    popen: subprocess.Popen[bytes] | None = None
    master_url: str = ""  # chunkservers: reach the master here instead (e.g. through a proxy)
    advertise: str = ""  # chunkservers: tell others to reach it here

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data.parent / f"{self.name}.log"


class LocalCluster:
    def __init__(self, data_dir: Path, n_chunkservers: int = 3, chunk_size: int = 64 << 20,
                 replication: int = 3, master_port: int | None = None, heartbeat: float = 0.5,
                 dead_after: float = 3.0, token: str | None = None, zones: list[str] | None = None,
                 regions: list[str] | None = None, checkpoint_ops: int = 100_000,
                 master_host: str = "127.0.0.1", scrub_interval: float = 60.0,
                 master_args: list[str] | None = None) -> None:
        self.scrub_interval = scrub_interval
        self.master_args = master_args or []  # extra ``kubegfs master`` flags
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tok_file = self.data_dir / "token"
        if token is None:
            if tok_file.exists():
                token = tok_file.read_text().strip()
            else:
                token = secrets.token_urlsafe(24)
                tok_file.write_text(token)
                tok_file.chmod(0o600)
        self.token = token
        self.chunk_size = chunk_size
        self.replication = replication
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.checkpoint_ops = checkpoint_ops
        if master_port is None or not port_free(master_host, master_port):
            master_port = free_port(master_host)
        self.master = Proc("master", master_host, master_port, self.data_dir / "master",
                           "node-0", (zones or ZONES)[0], (regions or ["region-1"])[0])
        zones = zones or ZONES
        regions = regions or ["region-1"]
        self.chunkservers: list[Proc] = []
        for i in range(n_chunkservers):
            self.add_chunkserver_spec(i, zones[i % len(zones)], regions[i % len(regions)])

    def add_chunkserver_spec(self, i: int, zone: str, region: str, node: str | None = None) -> Proc:
        return self.add_chunkserver_at(f"cs{i + 1}", f"127.0.{i + 1}.1", node or f"node-{i + 1}", zone, region)

    def add_chunkserver_at(self, name: str, host: str, node: str, zone: str, region: str) -> Proc:
        """Declare a chunkserver on a given loopback address (e.g. a simulated pod's IP)."""
        p = Proc(name, host, free_port(host), self.data_dir / name, node, zone, region)
        self.chunkservers.append(p)
        return p

    @property
    def master_url(self) -> str:
        return self.master.url

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["KUBEGFS_TOKEN"] = self.token
        e.setdefault("PYTHONUNBUFFERED", "1")
        return e

    def _spawn(self, p: Proc, args: list[str]) -> None:
        p.data.mkdir(parents=True, exist_ok=True)
        log = open(p.log_path, "ab")
        p.popen = subprocess.Popen(
            [sys.executable, "-m", "kubegfs", *args], env=self.env(), stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def start_master(self, wait: bool = True, timeout: float = 30.0) -> None:
        m = self.master
        self._spawn(m, ["master", "--listen", f"{m.host}:{m.port}", "--data", str(m.data),
                        "--chunk-size", str(self.chunk_size), "--replication", str(self.replication),
                        "--dead-after", str(self.dead_after), "--checkpoint-ops", str(self.checkpoint_ops),
                        "--node", m.node, "--zone", m.zone, "--region", m.region, *self.master_args])
        if wait:
            self._wait_http(m, "/healthz", timeout)

    def start_chunkserver(self, p: Proc, wait: bool = True) -> None:
        self._spawn(p, ["chunkserver", "--listen", f"{p.host}:{p.port}", "--master", p.master_url or self.master_url,
                        "--data", str(p.data), "--chunk-size", str(self.chunk_size),
                        "--heartbeat-interval", str(self.heartbeat),
                        "--scrub-interval", str(self.scrub_interval),
                        "--node", p.node, "--zone", p.zone, "--region", p.region,
                        *(["--advertise", p.advertise] if p.advertise else [])])
        if wait:
            self._wait_http(p, "/healthz")

    def start(self, timeout: float = 30.0) -> None:
        self.start_master()
        for p in self.chunkservers:
            self.start_chunkserver(p, wait=False)
        for p in self.chunkservers:
            self._wait_http(p, "/healthz")
        self.wait_registered(len(self.chunkservers), timeout)

    def wait_registered(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = requests.get(f"{self.master_url}/api/v1/chunkservers",
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=2)
                alive = [c for c in r.json()["chunkservers"] if c["alive"]]
                if len(alive) >= n:
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"only some chunkservers registered within {timeout}s; see {self.data_dir}/*.log")
            time.sleep(0.05)

    def _wait_http(self, p: Proc, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if p.popen is not None and p.popen.poll() is not None:
                tail = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")
            try:
                if requests.get(p.url + path, timeout=1).status_code < 500:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} did not answer on {p.url} within {timeout}s")
            time.sleep(0.05)

    def kill(self, p: Proc, sig: int = signal.SIGKILL) -> None:
        if p.popen is not None:
            signal_group(p.popen, sig)
            p.popen = None

    def stop(self) -> None:
        for p in [*self.chunkservers, self.master]:
            if p.popen is not None and p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in [*self.chunkservers, self.master]:
            if p.popen is not None:
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(p)
                p.popen = None

    def wait(self) -> None:
        while True:
            for p in [self.master, *self.chunkservers]:
                if p.popen is not None and p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}; see {p.log_path}")
            time.sleep(0.5)

    def client(self) -> Client:
        return Client(self.master_url, self.token)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
