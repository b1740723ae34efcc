"""A real multi-node Kubernetes cluster on this machine: kubelets + containerd, no Docker.

On top of :class:`~kubegfs_dev.controlplane.ControlPlane` (etcd, kube-apiserver, one
kube-controller-manager running the controllers a kubelet-backed cluster needs) this starts, as
plain processes whose PIDs are kept in ``<state>/pids.json``:

* per node: a containerd (Debian package; own root, state, socket, runc root), a CNI bridge
  ``kgfs-br<N>`` with pod CIDR ``198.18.<N>.0/24`` (node IP ``198.18.<N>.1``), a kubelet (own root
  dir, cgroup root ``/<node>``, zone/region labels);
* one kube-scheduler, one kube-proxy (iptables; one per host, the nodes share its netfilter) and
  CoreDNS (``kubernetes`` plugin) behind the ``kube-dns`` Service 198.19.0.10;
* dynamic PersistentVolumes: the default StorageClass ``local-path``, served by Rancher's
  local-path-provisioner running as a pod (:mod:`kubegfs_dev.localpath`); and a StorageClass
  ``local`` with pre-made local PersistentVolumes on every node.

Addresses: the API server listens on 198.18.0.1 and CoreDNS on 198.18.0.2, both on ``kgfs0`` (an
empty bridge that also carries the catch-all route of 198.18.0.0/15, so a packet for an unused
address there is dropped instead of leaving the machine); Services are in 198.19.0.0/16. Pods route
only 198.18.0.0/15, there is no masquerading: nothing a pod sends can leave the machine.

Host changes are recorded and undone by :mod:`kubegfs_dev.hostnet`. Only one such cluster runs on a
machine at a time (the bridges, addresses and kube-proxy's chains are host-wide): the state dir of
the running one is written to :data:`OWNER`, and :func:`up` first tears down a dead owner's
leftovers. ``python -m kubegfs_dev.cluster up|down|status --state DIR`` (``make cluster-up``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubegfs_dev import controlplane as cpm
from kubegfs_dev import hostnet, localpath, pids
from kubegfs_dev.util import free_port

API_IP = "198.18.0.1"
DNS_IP = "198.18.0.2"
SUPERNET = "198.18.0.0/15"
SERVICE_CIDR = "198.19.0.0/16"
KUBERNETES_SERVICE_IP = "198.19.0.1"
DNS_SERVICE_IP = "198.19.0.10"
CLUSTER_DOMAIN = "cluster.local"
HOST_LINK = "kgfs0"
PAUSE_IMAGE = "localhost/kubegfs/pause:kubegfs-1"
STORAGE_CLASS = "local"
VOLUMES_PER_NODE = 6
OWNER = Path("/run/kubegfs-cluster.owner")
LOCK = Path("/run/lock/kubegfs-cluster.lock")
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
CNI_BIN = "/usr/lib/cni"
DEBIAN_PACKAGES = {CONTAINERD: "containerd", RUNC: "runc", f"{CNI_BIN}/bridge": "containernetworking-plugins",
                   "/usr/sbin/iptables": "iptables", "/usr/bin/buildah": "buildah",
                   str(localpath.BUSYBOX): "busybox-static"}

# Everything a kubelet-backed cluster needs from kube-controller-manager (the control-plane-only
# harness runs just the first five: with fake nodes node-lifecycle would evict their pods).
KCM_CONTROLLERS = (*cpm.KCM_CONTROLLERS,
                   "node-lifecycle-controller", "taint-eviction-controller",
                   "deployment-controller", "replicaset-controller", "statefulset-controller",
                   "job-controller", "disruption-controller",
                   "endpointslice-controller", "endpointslice-mirroring-controller",
                   "persistentvolume-binder-controller", "persistentvolume-protection-controller",
                   "persistentvolumeclaim-protection-controller", "ttl-after-finished-controller")


class ClusterError(RuntimeError):
    """The cluster could not be set up, reached or torn down."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: ``index`` picks its bridge, pod CIDR and node IP."""

    index: int
    zone: str
    region: str

    @property
    def name(self) -> str:
        return f"kgfs-n{self.index}"

    @property
    def ip(self) -> str:
        return f"198.18.{self.index}.1"

    @property
    def pod_cidr(self) -> str:
        return f"198.18.{self.index}.0/24"

    @property
    def bridge(self) -> str:
        return f"kgfs-br{self.index}"

    @property
    def labels(self) -> dict[str, str]:
        return {"topology.kubernetes.io/zone": self.zone, "topology.kubernetes.io/region": self.region}


# Three zones over two regions: zone-a and zone-b share region-1.
DEFAULT_NODES = (NodeSpec(1, "zone-a", "region-1"), NodeSpec(2, "zone-b", "region-1"),
                 NodeSpec(3, "zone-c", "region-2"))


def parse_nodes(specs: Sequence[str]) -> tuple[NodeSpec, ...]:
    """``["zone-a/region-1", ...]`` -> nodes 1..N (at most 200: 198.18.<N>.0/24)."""
    nodes = []
    for i, s in enumerate(specs, start=1):
        zone, sep, region = s.partition("/")
        if not sep or not zone or not region:
            raise ValueError(f"node spec {s!r}: expected ZONE/REGION")
        nodes.append(NodeSpec(i, zone, region))
    if not 1 <= len(nodes) <= 200:
        raise ValueError("between 1 and 200 nodes")
    return tuple(nodes)


def ensure_packages() -> None:
    """containerd, runc, the CNI plugins, iptables and buildah from Debian (apt-get if missing)."""
    missing = sorted({pkg for path, pkg in DEBIAN_PACKAGES.items() if not os.path.exists(path)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise ClusterError(f"missing Debian packages {missing} and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)  # noqa: S603
        if r.returncode == 0 and all(os.path.exists(p) for p in DEBIAN_PACKAGES):
            return
    raise ClusterError(f"apt-get install {' '.join(missing)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


# --------------------------------------------------------------------------- processes


@dataclass
class _Procs:
    """Processes of the cluster (besides the control plane's own), recorded in pids.json."""

    state: Path
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.state / "pids.json"

    def load(self) -> None:
        self.entries = list((pids.read(self.path) or {}).get("processes", []))

    def save(self) -> None:
        pids.write(self.path, self.entries)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,  # noqa: S603
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=self.state,
                                 env=env)
        self.entries.append({**pids.entry(name, p.pid), "log": str(log)})
        self.save()
        return p.pid

    def get(self, name: str) -> dict[str, Any]:
        for e in self.entries:
            if e["name"] == name:
                return e
        raise KeyError(name)

    def alive(self, name: str) -> bool:
        e = self.get(name)
        return pids.ours(e)

    def stop(self, name: str, timeout: float = 15) -> None:
        gone = [e for e in self.entries if e["name"] == name]
        for e in gone:
            if pids.ours(e):
                pids.stop_group(int(e["pid"]), timeout)
            self.entries.remove(e)
        if gone:
            self.save()


def _wait(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None,
          alive: Callable[[], bool] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if alive is not None and not alive():
            raise ClusterError(f"{what}: the process exited; log {log}:\n{cpm._tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not ready after {timeout:.0f}s; log {log}:\n"
                               f"{cpm._tail(log) if log else ''}")
        time.sleep(0.25)


def _http_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=3, context=ctx) as r:  # noqa: S310 - loopback
        return bool(r.status == 200)


# --------------------------------------------------------------------------- configs


def containerd_config(d: Path) -> str:
    return f"""version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    # no CAP_SYS_RESOURCE here: never ask runc to lower oom_score_adj below containerd's own
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "{RUNC}"
          Root = "{d}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN}"
      conf_dir = "{d.parent}/cni/net.d"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
"""


def cni_config(node: NodeSpec, d: Path) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": f"kgfs-net{node.index}",
        "plugins": [
            {"type": "bridge", "bridge": node.bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(d / "ipam"),
                      "ranges": [[{"subnet": node.pod_cidr, "gateway": node.ip}]],
                      # no default route: pods reach pods, Services and the API, nothing else
                      "routes": [{"dst": SUPERNET}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
        ],
    }


def kubelet_config(node: NodeSpec, d: Path, sock: Path, ca: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{sock}",
        "imageServiceEndpoint": f"unix://{sock}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "cgroupRoot": f"/{node.name}",
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "address": node.ip,
        "port": 10250,
        "healthzPort": 0,
        "readOnlyPort": 0,
        "podLogsDir": str(d / "podlogs"),
        "resolvConf": "",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "oomScoreAdj": 0,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "serializeImagePulls": False,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "Webhook"},
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        # the images are imported, not pullable: never garbage-collect them
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
    }


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    return f""".:53 {{
    bind {DNS_IP}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
    cache 30
    loadbalance
}}
"""


# RBAC of CoreDNS's own identity (the usual system:coredns role), the kube-dns Service pointing at
# the host-run CoreDNS, and the local StorageClass.
def bootstrap_objects() -> list[dict[str, Any]]:
    dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}]},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
         "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [{**p, "targetPort": 53} for p in dns_ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "cluster.kubegfs.io"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [DNS_IP], "conditions": {"ready": True}}],
         "ports": dns_ports},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": STORAGE_CLASS},  # the default is local-path (localpath.py)
         "provisioner": "kubernetes.io/no-provisioner",
         "volumeBindingMode": "WaitForFirstConsumer",
         "reclaimPolicy": "Retain"},
    ]


def local_volume(node: NodeSpec, path: Path, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{node.name}-pv{i}", "labels": {"kubegfs.io/node": node.name}},
        "spec": {
            "capacity": {"storage": "100Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "local": {"path": str(path)},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node.name]}]}]}},
        },
    }


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """The cluster whose state lives in ``state`` (see the module docstring)."""

    state: Path
    nodes: tuple[NodeSpec, ...] = DEFAULT_NODES
    bin_dir: Path | None = None
    start_timeout: float = 120.0
    # The cluster of a test session: whoever finds it while this PID is gone tears it down.
    guard_pid: int | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(f"# {msg}", file=sys.stderr))

    def __post_init__(self) -> None:
        self.state = self.state.resolve()

    # ---- paths
    @property
    def cp_state(self) -> Path:
        return self.state / "controlplane"

    @property
    def pki(self) -> Path:
        return self.cp_state / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.cp_state / "kubeconfig"

    def node_dir(self, node: NodeSpec) -> Path:
        return self.state / "nodes" / node.name

    def containerd_sock(self, node: NodeSpec) -> Path:
        return self.node_dir(node) / "containerd" / "containerd.sock"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return cpm.run_kubectl(self.kubeconfig, *args, input=input, check=check, timeout=timeout)

    def apply(self, objs: Sequence[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))

    def ctr(self, node: NodeSpec, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return hostnet.run(CTR, "-a", str(self.containerd_sock(node)), "-n", "k8s.io", *args, timeout=timeout)

    # ---- lifecycle
    def up(self) -> Path:
        """Start everything (tearing down leftovers first); return the admin kubeconfig."""
        if os.geteuid() != 0:
            raise ClusterError("real nodes need root (containerd, kubelet, bridges, iptables)")
        ensure_packages()
        binaries = {n: cpm.find_binary(n, self.bin_dir)
                    for n in ("kubelet", "kube-scheduler", "kube-proxy", "coredns", "pause",
                              "local-path-provisioner")}
        with _machine_lock():
            if _owner() == self.state and running(self.state):
                self.log(f"already running (state {self.state})")
                return self.kubeconfig
            self._take_ownership()
            t0 = time.monotonic()
            try:
                self._up(binaries)
            except BaseException:
                self.log("cluster up failed; tearing down what was started")
                self._down()
                raise
        self.log(f"cluster up in {time.monotonic() - t0:.1f}s: {len(self.nodes)} nodes; logs in {self.state / 'logs'}")
        return self.kubeconfig

    def _take_ownership(self) -> None:
        other = _owner()
        if other is not None and other != self.state:
            if running(other):
                raise ClusterError(f"another real-node cluster is running (state {other}); "
                                   f"stop it first: python -m kubegfs_dev.cluster down --state {other}")
            self.log(f"cleaning up the leftovers of a dead cluster in {other}")
            Cluster(other, log=self.log)._down()
        self._down()  # our own leftovers
        self.state.mkdir(parents=True, exist_ok=True)
        if self.guard_pid is not None:
            (self.state / "guard.json").write_text(json.dumps(pids.entry("guard", self.guard_pid)) + "\n")
        OWNER.write_text(str(self.state) + "\n")

    def _up(self, binaries: dict[str, Path]) -> None:
        procs = _Procs(self.state)
        hostnet.record(self.state, links=[HOST_LINK, *(n.bridge for n in self.nodes)],
                       cgroups=[n.name for n in self.nodes])
        self._host_network()
        cp = cpm.ControlPlane(
            state_dir=self.cp_state, bin_dir=self.bin_dir, detached=True, host=API_IP,
            apiserver_sans=[f"IP:{API_IP}", f"IP:{KUBERNETES_SERVICE_IP}"],
            disable_admission_plugins=(),  # ServiceAccount: pods get their token volume
            kcm_controllers=KCM_CONTROLLERS,
            extra_apiserver_args=[
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node",  # appended to RBAC: kubelets act as system:node:<name>
                "--enable-admission-plugins=NodeRestriction",
                "--endpoint-reconciler-type=lease",  # the `kubernetes` Service gets 198.18.0.1
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={self.pki / 'admin.crt'}",
                f"--kubelet-client-key={self.pki / 'admin.key'}",
            ])
        cp.start()
        kc = self._identities(cp)
        tars = [self._scratch_image(PAUSE_IMAGE, [(binaries["pause"], "/pause")], ["/pause"], "65535:65535")]
        tars += [self._scratch_image(ref, files, [files[0][1]], user)
                 for ref, files, user in localpath.images(binaries["local-path-provisioner"])]
        for node in self.nodes:
            self._start_containerd(procs, node)
            for tar in tars:
                self.ctr(node, "images", "import", str(tar))
            self._start_kubelet(procs, node, binaries["kubelet"], kc[node.name])
        sched_port, proxy_health, proxy_metrics, dns_health, dns_ready = (free_port() for _ in range(5))
        procs.spawn("kube-scheduler", [str(binaries["kube-scheduler"]), f"--kubeconfig={kc['scheduler']}",
                                       f"--authentication-kubeconfig={kc['scheduler']}",
                                       f"--authorization-kubeconfig={kc['scheduler']}",
                                       "--leader-elect=false", "--bind-address=127.0.0.1",
                                       f"--secure-port={sched_port}"])
        procs.spawn("kube-proxy", [str(binaries["kube-proxy"]), f"--kubeconfig={kc['proxy']}",
                                   "--proxy-mode=iptables", f"--hostname-override={self.nodes[0].name}",
                                   f"--nodeport-addresses={SUPERNET}", "--iptables-localhost-nodeports=false",
                                   f"--healthz-bind-address=127.0.0.1:{proxy_health}",
                                   f"--metrics-bind-address=127.0.0.1:{proxy_metrics}",
                                   # 0: leave the host's conntrack table size and timeouts alone
                                   "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                                   "--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0"])
        (self.state / "Corefile").write_text(corefile(kc["coredns"], dns_health, dns_ready))
        self.apply(bootstrap_objects())
        procs.spawn("coredns", [str(binaries["coredns"]), "-conf", str(self.state / "Corefile")])
        self._volumes()
        self.apply(localpath.objects(self.nodes, self.node_dir))
        logs = self.state / "logs"
        _wait("kube-scheduler", lambda: _http_ok(f"https://127.0.0.1:{sched_port}/healthz"),
              self.start_timeout, logs / "kube-scheduler.log", lambda: procs.alive("kube-scheduler"))
        _wait("kube-proxy", lambda: _http_ok(f"http://127.0.0.1:{proxy_health}/healthz"),
              self.start_timeout, logs / "kube-proxy.log", lambda: procs.alive("kube-proxy"))
        _wait("coredns", lambda: _http_ok(f"http://127.0.0.1:{dns_ready}/ready"),
              self.start_timeout, logs / "coredns.log", lambda: procs.alive("coredns"))
        for node in self.nodes:
            _wait(f"node {node.name} Ready", lambda n=node: self._node_ready(n.name),  # type: ignore[misc]
                  self.start_timeout, logs / f"kubelet-{node.name}.log",
                  lambda n=node: procs.alive(f"kubelet-{n.name}"))  # type: ignore[misc]
        _wait("the local-path provisioner pod", self._provisioner_ready, self.start_timeout,
              logs / f"kubelet-{self.nodes[0].name}.log")
        link = self.state / "kubeconfig"
        link.unlink(missing_ok=True)
        link.symlink_to(self.kubeconfig)

    def _host_network(self) -> None:
        # 198.18.0.1 (API) and .2 (DNS) on an empty bridge that also takes the catch-all route of
        # the whole range: an address not on some node's bridge goes nowhere.
        hostnet.ensure_bridge(HOST_LINK, [f"{API_IP}/32", f"{DNS_IP}/32"])
        hostnet.ensure_route(SUPERNET, HOST_LINK, API_IP)
        for node in self.nodes:
            # pre-created so the kubelet's node IP exists before the first pod; the CNI bridge
            # plugin reuses it
            hostnet.ensure_bridge(node.bridge, [f"{node.ip}/24"])
        hostnet.write_sysctl("net.ipv4.ip_forward", "1")  # between the node bridges only: see routes
        if hostnet.read_sysctl("net.bridge.bridge-nf-call-iptables") not in (None, "1"):
            hostnet.write_sysctl("net.bridge.bridge-nf-call-iptables", "1")

    def _identities(self, cp: cpm.ControlPlane) -> dict[str, Path]:
        """Client certificates + kubeconfigs: one per kubelet (Node authorizer), scheduler, proxy, DNS."""
        who = {n.name: (f"system:node:{n.name}", ["system:nodes"]) for n in self.nodes}
        who |= {"scheduler": ("system:kube-scheduler", []), "proxy": ("system:kube-proxy", []),
                "coredns": ("system:coredns", [])}
        out = {}
        for name, (cn, orgs) in who.items():
            crt, key = self.pki / f"{name}.crt", self.pki / f"{name}.key"
            if not crt.exists():
                cpm._issue_cert(self.pki, name, cn=cn, orgs=orgs, client=True)
            out[name] = cpm._write_kubeconfig(self.cp_state / f"{name}.kubeconfig", server=cp.url,
                                              ca=cp.ca_file, user=cn, cert=crt, key=key)
        return out

    def _provisioner_ready(self) -> bool:
        r = self.kubectl("get", "deployment", "-n", localpath.NAMESPACE, "local-path-provisioner",
                         "-o", "jsonpath={.status.availableReplicas}", check=False, timeout=10)
        return r.stdout.strip() == "1"

    def _scratch_image(self, ref: str, files: list[tuple[Path, str]], entrypoint: list[str], user: str) -> Path:
        """An image of static binaries only (FROM scratch) as an OCI archive to import."""
        tar = self.state / "images" / (ref.rsplit("/", 1)[1].replace(":", "_") + ".tar")
        if tar.exists():
            return tar
        tar.parent.mkdir(parents=True, exist_ok=True)
        b = ["buildah", "--storage-driver", "vfs", "--root", str(self.state / "buildah" / "root"),
             "--runroot", str(self.state / "buildah" / "run")]
        ctr = hostnet.run(*b, "from", "scratch").stdout.strip()
        try:
            for src, dst in files:
                hostnet.run(*b, "copy", ctr, str(src), dst)
            hostnet.run(*b, "config", "--entrypoint", json.dumps(entrypoint), "--cmd", "", "--user", user,
                        "--env", "PATH=/bin", ctr)
            hostnet.run(*b, "commit", "-q", ctr, ref)
        finally:
            hostnet.run(*b, "rm", ctr, check=False)
        hostnet.run(*b, "push", ref, f"oci-archive:{tar}.tmp:{ref}")
        Path(f"{tar}.tmp").replace(tar)
        hostnet.run(*b, "rmi", "-a", check=False)
        hostnet.unmount_under(self.state / "buildah")
        shutil.rmtree(self.state / "buildah", ignore_errors=True)
        return tar

    def _start_containerd(self, procs: _Procs, node: NodeSpec) -> None:
        d = self.node_dir(node) / "containerd"
        (self.node_dir(node) / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        (self.node_dir(node) / "cni" / "net.d" / "10-kgfs.conflist").write_text(
            json.dumps(cni_config(node, self.node_dir(node) / "cni"), indent=2) + "\n")
        (d / "config.toml").write_text(containerd_config(d))
        hostnet.make_cgroup(node.name)
        name = f"containerd-{node.name}"
        procs.spawn(name, [CONTAINERD, "--config", str(d / "config.toml")])
        _wait(name, lambda: hostnet.run(CTR, "-a", str(d / "containerd.sock"), "version", timeout=5).returncode == 0,
              self.start_timeout, self.state / "logs" / f"{name}.log", lambda: procs.alive(name))

    def _start_kubelet(self, procs: _Procs, node: NodeSpec, kubelet: Path, kubeconfig: Path) -> None:
        d = self.node_dir(node) / "kubelet"
        (d / "root").mkdir(parents=True, exist_ok=True)
        cfg = d / "config.json"
        cfg.write_text(json.dumps(kubelet_config(node, d, self.containerd_sock(node), self.pki / "ca.crt"),
                                  indent=2) + "\n")
        labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
        procs.spawn(f"kubelet-{node.name}", [
            str(kubelet), f"--config={cfg}", f"--kubeconfig={kubeconfig}", f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}", f"--hostname-override={node.name}", f"--node-ip={node.ip}",
            f"--node-labels={labels}", "-v=1"])

    def _node_ready(self, name: str) -> bool:
        r = self.kubectl("get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                         check=False, timeout=10)
        return r.stdout.strip() == "True"

    def _volumes(self) -> None:
        pvs = []
        for node in self.nodes:
            for i in range(VOLUMES_PER_NODE):
                path = self.node_dir(node) / "volumes" / f"pv{i}"
                path.mkdir(parents=True, exist_ok=True)
                pvs.append(local_volume(node, path, i))
        self.apply(pvs)

    def recycle_volumes(self) -> int:
        """Make the local PVs whose claims were deleted (``Released``) empty and ``Available``
        again — what a dynamic provisioner's Delete reclaim would do. Returns how many."""
        pvs = json.loads(self.kubectl("get", "pv", "-l", "kubegfs.io/node", "-o", "json").stdout)["items"]
        released = [pv for pv in pvs if pv.get("status", {}).get("phase") in ("Released", "Failed")]
        for pv in released:
            path = Path(pv["spec"]["local"]["path"])
            if self.state not in path.parents:  # only ever wipe our own volume dirs
                continue
            self.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=true", "--timeout=60s")
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            node = next(n for n in self.nodes if n.name == pv["metadata"]["labels"]["kubegfs.io/node"])
            self.apply([local_volume(node, path, int(pv["metadata"]["name"].rsplit("pv", 1)[1]))])
        return len(released)

    def load_images(self, refs: Sequence[str]) -> None:
        """Copy images from the host's buildah storage into every node's containerd."""
        out = self.state / "images"
        out.mkdir(parents=True, exist_ok=True)
        for ref in refs:
            tar = out / (ref.replace("/", "_").replace(":", "_") + ".tar")
            tar.unlink(missing_ok=True)
            # uncompressed layers: gzip would cost more CPU than the copy saves on one machine
            hostnet.run("buildah", "push", "--quiet", "--disable-compression", ref, f"oci-archive:{tar}:{ref}",
                        timeout=600)
            for node in self.nodes:
                self.ctr(node, "images", "import", str(tar))
            tar.unlink()

    # ---- teardown
    def down(self) -> None:
        with _machine_lock():
            self._down()

    def _down(self) -> None:
        """Stop and remove everything of this state dir; safe to repeat."""
        procs = _Procs(self.state)
        procs.load()
        for name in ("kube-scheduler", "coredns"):
            procs.stop(name)
        for e in [e for e in procs.entries if e["name"].startswith("kubelet-")]:
            procs.stop(e["name"])
        nodes_dir = self.state / "nodes"
        rec = hostnet.load(self.state)
        # the containers, while their shims still run to reap them; then their cgroups
        for name in (rec["cgroups"] if rec else []):
            hostnet.remove_cgroup(name)
        for e in [e for e in procs.entries if e["name"].startswith("containerd-")]:
            procs.stop(e["name"])
        for pidfile in nodes_dir.glob("*/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if pids.alive(pid) and "containerd-shim" in _cmdline0(pid):
                    pids.stop_group(pid, 5)
        hostnet.unmount_under(self.state)
        if "kube-proxy" in {e["name"] for e in procs.entries}:
            procs.stop("kube-proxy")
            with contextlib.suppress(cpm.BinaryNotFound, hostnet.HostError, subprocess.TimeoutExpired):
                hostnet.run(str(cpm.find_binary("kube-proxy", self.bin_dir)), "--cleanup",
                            "--proxy-mode=iptables", check=False)
        for e in list(procs.entries):
            procs.stop(e["name"])
        cpm.down(self.cp_state)
        hostnet.restore(self.state, log=self.log)
        shutil.rmtree(nodes_dir, ignore_errors=True)
        shutil.rmtree(self.cp_state / "etcd", ignore_errors=True)
        (self.state / "kubeconfig").unlink(missing_ok=True)
        procs.path.unlink(missing_ok=True)
        (self.state / "guard.json").unlink(missing_ok=True)
        if _owner() == self.state:
            OWNER.unlink(missing_ok=True)


def _cmdline0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _owner() -> Path | None:
    try:
        text = OWNER.read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


@contextlib.contextmanager
def _machine_lock(timeout: float = 1200) -> Iterator[None]:
    """One `up`/`down` at a time on this machine (the cluster itself is owned via OWNER)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{LOCK} held by another cluster up/down for {timeout:.0f}s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _guard_alive(state: Path) -> bool:
    """A cluster started with ``guard_pid`` lives only as long as that process (a test session)."""
    try:
        g = json.loads((state / "guard.json").read_text())
    except (OSError, ValueError):
        return True
    return pids.ours(g)


def running(state: Path) -> bool:
    """Do the recorded processes of the cluster in ``state`` still run (and its guard, if any)?"""
    procs = _Procs(state.resolve())
    procs.load()
    return (bool(procs.entries) and _guard_alive(state.resolve())
            and any(pids.ours(e) for e in procs.entries))


def wait_free(timeout: float) -> None:
    """Wait until no other live cluster owns this machine (tests queue behind each other)."""
    deadline = time.monotonic() + timeout
    while (other := _owner()) is not None and running(other):
        if time.monotonic() > deadline:
            raise ClusterError(f"the real-node cluster of {other} has been running for more than "
                               f"{timeout:.0f}s; only one runs per machine")
        time.sleep(2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubegfs_dev.cluster",
                                 description="A real multi-node Kubernetes cluster on this machine.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start (detached) and print the KUBECONFIG export line")
    p_up.add_argument("--state", type=Path, required=True)
    p_up.add_argument("--node", action="append", default=[], metavar="ZONE/REGION",
                      help="one per node (default: zone-a/region-1 zone-b/region-1 zone-c/region-2)")
    p_up.add_argument("--images", nargs="*", default=[], help="buildah images to load into every node")
    for name in ("down", "status"):
        sub.add_parser(name).add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            nodes = parse_nodes(args.node) if args.node else DEFAULT_NODES
            c = Cluster(args.state, nodes=nodes)
            kubeconfig = c.up()
            if args.images:
                c.load_images(args.images)
            print(f"export KUBECONFIG={kubeconfig}")
            return 0
        if args.cmd == "down":
            Cluster(args.state).down()
            print("# cluster down", file=sys.stderr)
            return 0
        ok = running(args.state)
        print("running" if ok else "not running")
        return 0 if ok else 1
    except (ClusterError, cpm.ControlPlaneError, hostnet.HostError, ValueError) as e:
        print(f"cluster {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
