"""The kubegfs Helm release on a real-node cluster (:mod:`kubegfs_dev.cluster`): the values that
use the locally imported images and a placement that makes "nearest chunkserver" non-trivial,
and the helpers the tests in ``tests/cluster`` and ``make demo-cluster`` share.

Placement: the master is pinned to ``kgfs-n1`` (zone-a, region-1) and the chunkservers may not run
there, so they land on ``kgfs-n2`` (zone-b, region-1) and ``kgfs-n3`` (zone-c, region-2): the
chunkserver nearest the master is a same-region one, neither a same-node one nor simply the first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubegfs.client import Client
from kubegfs_dev.cluster import Cluster
from kubegfs_dev.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubegfs"
RELEASE = "kubegfs"  # examples/snapshot.yaml names this cluster
MASTER_NODE = "kgfs-n1"
CHUNKSERVERS = 3
COMPONENTS = ("master", "chunkserver", "operator")


def checkout_tag(version: str) -> str:
    """An image tag (and wheel version) of this checkout alone: worktrees on one machine share
    buildah's image store, and a test must not load the images another checkout built since."""
    return f"{version}.dev{int(hashlib.sha256(str(REPO).encode()).hexdigest()[:7], 16)}"


def values(namespace: str, *, chunk_size: str = "256Ki", replication: int = 2,
           image_tag: str | None = None) -> dict[str, Any]:
    small = {"requests": {"cpu": "50m", "memory": "128Mi"}}
    tag = {"image": {"tag": image_tag}} if image_tag else {}
    return {
        # imported into every node's containerd, never pulled
        "image": {"registry": "localhost", "pullPolicy": "Never"},
        "filesystem": {"chunkSize": chunk_size, "replication": replication},
        "master": {"nodeSelector": {"kubernetes.io/hostname": MASTER_NODE},
                   "persistence": {"size": "1Gi"}, "resources": small, **tag},
        "chunkservers": {
            "replicas": CHUNKSERVERS, "persistence": {"size": "2Gi"}, "resources": small, **tag,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [MASTER_NODE]}]}]}}},
        },
        # only its own namespace: another release in the cluster (the demo's) has its own operator
        "operator": {"resources": small, "watchNamespaces": [namespace], **tag},
        "metrics": {"podAnnotations": True},
    }


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 180, interval: float = 1.0) -> Any:
    """Poll until ``fn`` returns something truthy; errors on the way (a pod restarting, a master
    not answering yet) are retried and the last one is reported on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = repr(e)
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}")


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod.get("status", {}).get("phase") == "Running" and conds.get("Ready") == "True"


class Release:
    """The release ``RELEASE`` in namespace ``ns`` of ``cluster``."""

    def __init__(self, cluster: Cluster, ns: str, workdir: Path, image_tag: str | None = None) -> None:
        self.c = cluster
        self.ns = ns
        self.workdir = workdir
        self.cp = ControlPlane(state_dir=cluster.cp_state, bin_dir=cluster.bin_dir)  # its helm() runner
        self.values_file = workdir / "values.json"
        self.values_file.write_text(json.dumps(values(ns, image_tag=image_tag)))

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.c.kubectl(*args, check=check, input=input, timeout=300).stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-n", self.ns, *args, "-o", "json"))

    def helm(self, *args: str, timeout: float = 600) -> str:
        return self.cp.helm(*args, timeout=timeout).stdout

    def create_namespace(self) -> None:
        """The namespace, enforcing Pod Security ``restricted``."""
        self.kubectl("create", "namespace", self.ns)
        self.kubectl("label", "namespace", self.ns, "pod-security.kubernetes.io/enforce=restricted",
                     "pod-security.kubernetes.io/enforce-version=latest")

    def install(self, *extra: str) -> None:
        self.helm("install", RELEASE, str(CHART), "-n", self.ns, "-f", str(self.values_file),
                  "--wait", "--timeout", "8m", *extra)

    def remove(self) -> None:
        """Snapshots first (their finalizer needs the operator), then the release and namespace."""
        self.kubectl("delete", "gsnap,grestore", "-n", self.ns, "--all", "--timeout=120s", check=False)
        self.cp.helm("uninstall", RELEASE, "-n", self.ns, "--wait", "--ignore-not-found", check=False)
        self.kubectl("delete", "namespace", self.ns, "--wait=false", "--ignore-not-found", check=False)

    def pods(self, component: str) -> list[dict[str, Any]]:
        items = self.get("pods", "-l", f"app.kubernetes.io/instance={RELEASE},"
                                       f"app.kubernetes.io/component={component}")["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def all_ready(self) -> list[dict[str, Any]]:
        """Every pod of the release when all of them (1 master, the chunkservers, the operator) are Ready."""
        pods = [p for comp in COMPONENTS for p in self.pods(comp)]
        return pods if len(pods) == 2 + CHUNKSERVERS and all(pod_ready(p) for p in pods) else []

    def token(self, role: str = "token") -> str:
        """The chart's token for a role (kubegfs/auth.py): ``token`` (clients), ``internal-token``,
        ``metrics-token``."""
        secret = self.get("secret", f"{RELEASE}-token")
        return base64.b64decode(secret["data"][role]).decode()

    def cacert(self) -> Path:
        """The CA the chart's TLS certificate is signed by (TLS is on by default), as a file."""
        secret = self.get("secret", f"{RELEASE}-tls")
        path = self.workdir / "ca.crt"
        path.write_bytes(base64.b64decode(secret["data"]["ca.crt"]))
        return path

    def tls_server_name(self) -> str:
        """The one name every kubegfs certificate of the release carries (pods are dialled by IP)."""
        return f"{RELEASE}.{self.ns}.kubegfs"

    def client(self) -> Client:
        """A client of the Ready master pod, from the host (pod IPs are routed here), over HTTPS
        verified against the release's CA."""
        from kubegfs.tls import ClientTLS

        master = wait_for("a Ready master pod", lambda: [p for p in self.pods("master") if pod_ready(p)])[0]
        return Client(f"https://{master['status']['podIP']}:9400", token=self.token(), timeout=30,
                      tls=ClientTLS(str(self.cacert()), self.tls_server_name()))

    def condition(self, kind: str, name: str, ctype: str = "Ready") -> dict[str, Any] | None:
        """The object when its condition ``ctype`` is True, else None."""
        obj = self.get(kind, name)
        for c in obj.get("status", {}).get("conditions", []):
            if c["type"] == ctype and c["status"] == "True":
                return obj
        return None

    def pv_path(self, pod: dict[str, Any]) -> Path:
        """Host directory of the local PersistentVolume behind a pod's ``data`` claim."""
        claim = next(v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                     if v["name"] == "data")
        pv = self.get("pvc", claim)["spec"]["volumeName"]
        return Path(json.loads(self.kubectl("get", "pv", pv, "-o", "json"))["spec"]["local"]["path"])
