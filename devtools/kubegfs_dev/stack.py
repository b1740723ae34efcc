"""kubegfs on the local control plane: simulated nodes and pods whose real master and
chunkserver processes listen on the pods' loopback IPs, plus the operator running as its own
ServiceAccount with exactly the RBAC in ``operator/rbac.yaml``. Used by the operator tests and
by ``make run`` / ``make up``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from kubegfs.local import LocalCluster, signal_group

from . import pids, sim
from .controlplane import ControlPlane
from .util import free_port, wait_http

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
RBAC_FILE = REPO / "operator" / "rbac.yaml"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    zone: str = ""
    region: str = ""


@dataclass(frozen=True)
class PodSpec:
    name: str
    node: str
    ip: str


def labels(instance: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubegfs", "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component}


def apply_crds(kubectl_env: dict[str, str], kubeconfig: Path) -> None:
    subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "apply", "--server-side",
                    "--force-conflicts", "-f", str(CRD_DIR)], check=True, capture_output=True,
                   env=kubectl_env, timeout=60)
    subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "wait", "--for=condition=Established",
                    "--timeout=60s", "crd/snapshots.kubegfs.io", "crd/restores.kubegfs.io",
                    "crd/snapshotschedules.kubegfs.io"],
                   check=True, capture_output=True, env=kubectl_env, timeout=90)


class K8sStack:
    def __init__(self, cp: ControlPlane, namespace: str, data_dir: Path, nodes: list[NodeSpec],
                 master: PodSpec, chunkservers: list[PodSpec], instance: str = "kubegfs",
                 chunk_size: int = 1 << 20, watch_all_namespaces: bool = False) -> None:
        self.cp = cp
        self.ns = namespace
        self.data_dir = data_dir
        self.nodes = {n.name: n for n in nodes}
        self.master_pod = master
        self.cs_pods = {p.name: p for p in chunkservers}
        self.instance = instance
        self.watch_all = watch_all_namespaces
        mn = self.nodes[master.node]
        self.cluster = LocalCluster(data_dir / "kubegfs", 0, chunk_size=chunk_size, heartbeat=0.3,
                                    dead_after=2.0, master_host=master.ip)
        self.cluster.master.node, self.cluster.master.zone, self.cluster.master.region = mn.name, mn.zone, mn.region
        self.cs_procs = {}
        for p in chunkservers:
            n = self.nodes[p.node]
            self.cs_procs[p.name] = self.cluster.add_chunkserver_at(p.name, p.ip, n.name, n.zone, n.region)
        self.operator: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.sa_kubeconfig: Path | None = None
        self._api: Any = None

    # ------------------------------------------------------------------ k8s objects

    @property
    def core(self) -> Any:
        from kubernetes import client

        if self._api is None:
            self._api = self.cp.api_client()
        return client.CoreV1Api(self._api)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        if self._api is None:
            self._api = self.cp.api_client()
        return client.CustomObjectsApi(self._api)

    def kubectl_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.cp.kubeconfig)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", "-n", self.ns, *args], env=self.kubectl_env(), input=input,
                              capture_output=True, text=True, check=check, timeout=120)

    def _ensure_namespace(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespace({"metadata": {"name": self.ns}})
        except ApiException as e:
            if e.status != 409:
                raise

    def _rbac(self) -> None:
        """The operator's ServiceAccount bound to exactly the ClusterRole of operator/rbac.yaml."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        role = yaml.safe_load(RBAC_FILE.read_text())
        role["metadata"]["name"] = f"kubegfs-operator-{self.ns}"
        rbac = client.RbacAuthorizationV1Api(self._api or self.cp.api_client())
        binding: Any = {
            "metadata": {"name": f"kubegfs-operator-{self.ns}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role["metadata"]["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": "kubegfs-operator", "namespace": self.ns}],
        }
        calls: list[tuple[Any, Any]] = [(rbac.create_cluster_role, role), (rbac.create_cluster_role_binding, binding)]
        for fn, body in calls:
            try:
                fn(body)
            except ApiException as e:
                if e.status != 409:
                    raise
        self.sa_kubeconfig = self.cp.service_account_kubeconfig(self.ns, "kubegfs-operator")

    def _create_nodes(self) -> None:
        from kubernetes.client.exceptions import ApiException

        for n in self.nodes.values():
            try:
                sim.create_node(self.core, n.name, zone=n.zone, region=n.region)
            except ApiException as e:
                if e.status != 409:
                    raise

    def create_pod(self, p: PodSpec, component: str) -> None:
        port = self.cluster.master.port if component == "master" else self.cs_procs[p.name].port
        sim.create_pod(self.core, self.ns, p.name, node=p.node, pod_ip=p.ip,
                       labels=labels(self.instance, component),
                       containers=[{"name": component, "image": "kubegfs/simulated:latest",
                                    "ports": [{"name": "http", "containerPort": port}]}])

    def delete_pod(self, name: str) -> None:
        sim.delete_pod(self.core, self.ns, name)

    # ------------------------------------------------------------------ processes

    def start(self) -> K8sStack:
        self._ensure_namespace()
        apply_crds(self.kubectl_env(), self.cp.kubeconfig)
        self._create_nodes()
        self._rbac()
        self.cluster.start()
        self.create_pod(self.master_pod, "master")
        for p in self.cs_pods.values():
            self.create_pod(p, "chunkserver")
        self.start_operator()
        return self

    @property
    def pids_file(self) -> Path:
        """The processes this stack started (see :mod:`kubegfs_dev.pids`; ``make down`` reads it)."""
        return self.data_dir / "pids.json"

    def record_pids(self) -> None:
        procs = [(p.name, p.popen.pid) for p in [self.cluster.master, *self.cluster.chunkservers]
                 if p.popen is not None]
        if self.operator is not None:
            procs.append(("operator", self.operator.pid))
        pids.write(self.pids_file, (pids.entry(name, pid) for name, pid in procs))

    def operator_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "KUBECONFIG": str(self.sa_kubeconfig), "KUBEGFS_TOKEN": self.cluster.token,
            "KUBEGFS_OPERATOR_METRICS": f"127.0.0.1:{self.metrics_port}",
            "KUBEGFS_CLUSTER": self.instance,
        })
        return env

    @property
    def operator_log(self) -> Path:
        return self.data_dir / "operator.log"

    def start_operator(self) -> None:
        args = [sys.executable, "-m", "kubegfs_operator", "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz", "--verbose"]
        if not self.watch_all:
            args += ["--namespace", self.ns]
        log = open(self.operator_log, "ab")
        self.operator = subprocess.Popen(args, env=self.operator_env(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        operator = self.operator

        def alive() -> None:
            if operator.poll() is not None:
                raise RuntimeError("operator exited:\n" + self.operator_log.read_text()[-3000:])

        try:
            wait_http(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=60, alive=alive,
                      ok=lambda status, _body: status == 200)
        except TimeoutError:
            raise RuntimeError("operator not live after 60s:\n"
                               + self.operator_log.read_text()[-3000:]) from None
        self.record_pids()

    def kill_operator(self, sig: int = signal.SIGKILL) -> None:
        if self.operator is not None:
            signal_group(self.operator, sig, timeout=20)
            self.operator = None

    def operator_metrics(self) -> str:
        r = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics",
                         headers={"Authorization": f"Bearer {self.cluster.token}"}, timeout=5)
        r.raise_for_status()
        return r.text

    def stop(self) -> None:
        self.kill_operator(signal.SIGTERM)
        self.cluster.stop()
        if self._api is not None:
            self._api.close()
            self._api = None

    # ------------------------------------------------------------------ custom objects

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object("kubegfs.io", "v1alpha1", self.ns, plural, name))

    def condition(self, plural: str, name: str, ctype: str = "Ready") -> str:
        try:
            obj = self.get(plural, name)
        except Exception:  # noqa: BLE001
            return "Missing"
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == ctype:
                return str(c["status"])
        return "Unknown"

