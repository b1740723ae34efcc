"""A whole kubegfs on this machine: a master and N chunkservers as child processes on distinct
loopback addresses (127.0.1.1, 127.0.2.1, …), spread over simulated zones and regions. Used by
``kubegfs local up``, the demo, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from .client import Client

ZONES = ["zone-a", "zone-b", "zone-c"]


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections and binds to port 0."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, for a server started later. It is chosen below the kernel's
    ephemeral range (and Kubernetes' NodePort range, 30000-32767), never twice in this process:
    a port the kernel hands out can be taken, between this check and the server's own bind, by
    any process's outgoing connection or bind to port 0 (a master once failed to start on a
    port picked that way while other tests ran)."""
    top = min(_ephemeral_low(), 30000)
    for _ in range(200):
        port = random.randrange(max(1024, top - 10000), top)
        if port not in _handed_out and port_free(host, port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # that range is crowded: take what the kernel gives
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


class ChildExited(RuntimeError):
    """A process the cluster started has exited on its own; says which and where its log is."""

    def __init__(self, name: str, returncode: int, log_path: Path) -> None:
        how = (f"was killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode}")
        super().__init__(f"{name} {how}; its log: {log_path}")
        self.name, self.returncode, self.log_path = name, returncode, log_path


class StopSignal(BaseException):
    """Raised in the main thread by :func:`stop_on_signals` (a BaseException like
    KeyboardInterrupt, so ``except Exception`` on the way up does not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signal_handlers(handler: object, sigs: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Install ``handler`` (a function, ``signal.SIG_IGN``…) for ``sigs`` for the duration."""
    old = {s: signal.signal(s, handler) for s in sigs}  # type: ignore[arg-type]
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _raise_stop(signum: int, _frame: object) -> None:
    for s in STOP_SIGNALS:  # once: a second signal must not interrupt the clean-up it starts
        signal.signal(s, signal.SIG_IGN)
    raise StopSignal(signum)


def stop_on_signals() -> contextlib.AbstractContextManager[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`StopSignal` in the main thread, so a
    ``finally`` stops what was started however the process is told to stop (Ctrl-C, ``timeout``
    or a service manager's SIGTERM, a closed terminal's SIGHUP)."""
    return signal_handlers(_raise_stop)


def signals_ignored() -> contextlib.AbstractContextManager[None]:
    """Hold off those signals while a bounded clean-up runs, so a second one cannot cut it short."""
    return signal_handlers(signal.SIG_IGN)


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
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data.parent / f"{self.name}.log"


class LocalCluster:
    def __init__(self, data_dir: Path, n_chunkservers: int = 3, chunk_size: int = 64 << 20,
                 replication: int = 3, master_port: int | None = None, heartbeat: float = 0.5,
                 dead_after: float = 3.0, token: str | None = None, zones: list[str] | None = None,
                 regions: list[str] | None = None, checkpoint_ops: int = 100_000,
                 master_host: str = "127.0.0.1", scrub_interval: float = 60.0,
                 master_args: list[str] | None = None, tls: bool = False,
                 tls_server_name: str = "kubegfs.local") -> None:
        self.tls = tls  # every process serves HTTPS with a certificate from a CA made in data_dir/tls
        self.tls_server_name = tls_server_name  # the name every client verifies (kubegfs/tls.py)
        self.cacert: Path | None = None
        self.scrub_interval = scrub_interval
        self.master_args = master_args or []  # extra ``kubegfs master`` flags
        self.chunkserver_args: list[str] = []  # extra ``kubegfs chunkserver`` flags
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # one token per role (kubegfs/auth.py), made once and kept in the data dir: zero config
        self.token = token if token is not None else self._role_token("token")
        self.internal_token = self._role_token("internal-token")
        self.metrics_token = self._role_token("metrics-token")
        self.chunk_size = chunk_size
        self.replication = replication
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.checkpoint_ops = checkpoint_ops
        if not master_port or not port_free(master_host, master_port):  # None or 0: any free port
            master_port = free_port(master_host)
        # the master's lean stat/ls listener (master/fastpath.py), kept across master restarts
        self.fast_port = free_port(master_host)
        self.master = Proc("master", master_host, master_port, self.data_dir / "master",
                           "node-0", (zones or ZONES)[0], (regions or ["region-1"])[0],
                           scheme="https" if tls else "http")
        zones = zones or ZONES
        regions = regions or ["region-1"]
        self.chunkservers: list[Proc] = []
        for i in range(n_chunkservers):
            self.add_chunkserver_spec(i, zones[i % len(zones)], regions[i % len(regions)])

    def _role_token(self, name: str) -> str:
        f = self.data_dir / name
        if f.exists():
            return f.read_text().strip()
        tok = secrets.token_urlsafe(24)
        f.write_text(tok)
        f.chmod(0o600)
        return tok

    def add_chunkserver_spec(self, i: int, zone: str, region: str, node: str | None = None) -> Proc:
        return self.add_chunkserver_at(f"cs{i + 1}", f"127.0.{i + 1}.1", node or f"node-{i + 1}", zone, region)

    def add_chunkserver_at(self, name: str, host: str, node: str, zone: str, region: str) -> Proc:
        """Declare a chunkserver on a given loopback address (e.g. a simulated pod's IP)."""
        p = Proc(name, host, free_port(host), self.data_dir / name, node, zone, region,
                 scheme="https" if self.tls else "http")
        self.chunkservers.append(p)
        return p

    @property
    def master_url(self) -> str:
        return self.master.url

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["KUBEGFS_TOKEN"] = self.token
        e["KUBEGFS_INTERNAL_TOKEN"] = self.internal_token
        e["KUBEGFS_METRICS_TOKEN"] = self.metrics_token
        for var in ("KUBEGFS_TOKEN_FILE", "KUBEGFS_INTERNAL_TOKEN_FILE", "KUBEGFS_METRICS_TOKEN_FILE",
                    "KUBEGFS_TLS_CERT", "KUBEGFS_TLS_KEY", "KUBEGFS_CACERT", "KUBEGFS_TLS_SERVER_NAME"):
            e.pop(var, None)  # what our own environment names must not override the cluster's
        e.update(self.tls_env())
        e.setdefault("PYTHONUNBUFFERED", "1")
        return e

    def tls_env(self) -> dict[str, str]:
        """KUBEGFS_TLS_* and KUBEGFS_CACERT for the cluster's processes and its clients."""
        if not self.tls:
            return {}
        from .tls import make_local_pki

        hosts = ["127.0.0.1", self.master.host, *(p.host for p in self.chunkservers)]
        ca, crt, key = make_local_pki(self.data_dir / "tls", hosts, [self.tls_server_name, "localhost"])
        self.cacert = ca
        return {"KUBEGFS_TLS_CERT": str(crt), "KUBEGFS_TLS_KEY": str(key), "KUBEGFS_CACERT": str(ca),
                "KUBEGFS_TLS_SERVER_NAME": self.tls_server_name}

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
                        "--node", m.node, "--zone", m.zone, "--region", m.region,
                        "--fast-listen", f"{m.host}:{self.fast_port}", *self.master_args])
        if wait:
            self._wait_http(m, "/healthz", timeout)

    def start_chunkserver(self, p: Proc, wait: bool = True) -> None:
        self._spawn(p, ["chunkserver", "--listen", f"{p.host}:{p.port}", "--master", p.master_url or self.master_url,
                        "--data", str(p.data), "--chunk-size", str(self.chunk_size),
                        "--heartbeat-interval", str(self.heartbeat),
                        "--scrub-interval", str(self.scrub_interval),
                        "--node", p.node, "--zone", p.zone, "--region", p.region,
                        *(["--advertise", p.advertise] if p.advertise else []), *self.chunkserver_args])
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
                r = requests.get(f"{self.master_url}/api/v1/chunkservers", verify=self.verify(),
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
                raise ChildExited(p.name, p.popen.returncode, p.log_path)
            try:
                if requests.get(p.url + path, timeout=1, verify=self.verify()).status_code < 500:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} did not answer on {p.url} within {timeout}s")
            time.sleep(0.05)

    def verify(self) -> str | bool:
        """``requests``' verify= for this cluster's servers."""
        return str(self.cacert) if self.cacert else True

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
        """Block until a process exits on its own (raises :class:`ChildExited`)."""
        while True:
            for p in [self.master, *self.chunkservers]:
                if p.popen is not None and p.popen.poll() is not None:
                    raise ChildExited(p.name, p.popen.returncode, p.log_path)
            time.sleep(0.5)

    def client(self, short_circuit: bool | None = None) -> Client:
        from .tls import ClientTLS

        tls = ClientTLS(str(self.cacert), self.tls_server_name) if self.cacert else ClientTLS()
        return Client(self.master_url, self.token, tls=tls, short_circuit=short_circuit)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
