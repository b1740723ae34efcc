"""Simulated topology without kubelets, the way KWOK does it.

Nodes are plain Node objects with the well-known topology labels; pods are created already bound
to a node (``spec.nodeName``) and their ``status`` subresource is patched to look like a running
pod whose IP is a loopback address chosen by the caller (e.g. ``127.0.1.1``). The test then starts
the real process that pod stands for (a kubegfs master or chunkserver) on that address, so
anything that reads ``pod.status.podIP`` from the API reaches a real process.

Pods bound to a node wait for a kubelet to finish graceful deletion; there is none, so
:func:`delete_pod` uses a grace period of 0.

All helpers take a ``kubernetes.client.CoreV1Api``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api, V1Node, V1Pod

HOSTNAME_LABEL = "kubernetes.io/hostname"
ZONE_LABEL = "topology.kubernetes.io/zone"
REGION_LABEL = "topology.kubernetes.io/region"
SIM_LABEL = "kubegfs.io/simulated"
DEFAULT_IMAGE = "kubegfs/simulated:latest"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def create_node(core: CoreV1Api, name: str, *, zone: str, region: str,
                labels: Mapping[str, str] | None = None, address: str = "127.0.0.1",
                ready: bool = True) -> V1Node:
    """Create a Node with hostname/zone/region labels and a Ready (or NotReady) status."""
    all_labels = {HOSTNAME_LABEL: name, ZONE_LABEL: zone, REGION_LABEL: region, SIM_LABEL: "true",
                  **(labels or {})}
    body: Any = {  # plain dicts are valid bodies for the client; typed as Any for mypy
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": all_labels},
        "spec": {},
    }
    core.create_node(body)
    now = _now()
    status: Any = {
        "status": {
            "conditions": [{
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "KubeletNotReady",
                "message": "simulated by kubegfs_dev.sim",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
            "addresses": [{"type": "InternalIP", "address": _check_ip(address)},
                          {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux",
                "kubeletVersion": "simulated", "kubeProxyVersion": "simulated",
                "containerRuntimeVersion": "simulated://0", "kernelVersion": "",
                "osImage": "kubegfs simulated node", "bootID": "", "machineID": "", "systemUUID": "",
            },
        }
    }
    return core.patch_node_status(name, status)


def delete_node(core: CoreV1Api, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        core.delete_node(name, grace_period_seconds=0)
    except ApiException as e:
        if e.status != 404:
            raise


def create_pod(core: CoreV1Api, namespace: str, name: str, *, node: str, pod_ip: str,
               labels: Mapping[str, str] | None = None,
               annotations: Mapping[str, str] | None = None,
               host_ip: str | None = None,
               containers: Sequence[Mapping[str, Any]] | None = None,
               owner_references: Sequence[Mapping[str, Any]] | None = None,
               running: bool = True) -> V1Pod:
    """Create a pod bound to ``node`` and (by default) mark it Running with IP ``pod_ip``."""
    _check_ip(pod_ip)
    meta: dict[str, Any] = {"name": name, "labels": dict(labels or {}),
                            "annotations": dict(annotations or {})}
    if owner_references:
        meta["ownerReferences"] = [dict(o) for o in owner_references]
    body: Any = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [dict(c) for c in containers] if containers else
                          [{"name": "main", "image": DEFAULT_IMAGE}],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
        },
    }
    pod = core.create_namespaced_pod(namespace, body)
    if not running:
        return pod
    return mark_running(core, namespace, name, pod_ip=pod_ip, host_ip=host_ip, pod=pod)


def mark_running(core: CoreV1Api, namespace: str, name: str, *, pod_ip: str,
                 host_ip: str | None = None, pod: V1Pod | None = None) -> V1Pod:
    """Patch the status subresource so the pod looks Running and Ready at ``pod_ip``."""
    pod_ip = _check_ip(pod_ip)
    if pod is None:
        pod = core.read_namespaced_pod(name, namespace)
    host_ip = _check_ip(host_ip) if host_ip else pod_ip
    now = _now()
    containers = (pod.spec.containers if pod.spec else None) or []
    status = {
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now, "lastProbeTime": None}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": now,
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image or DEFAULT_IMAGE,
                    "imageID": f"simulated://{c.image or DEFAULT_IMAGE}",
                    "containerID": f"simulated://{namespace}/{name}/{c.name}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
                for c in containers
            ],
        }
    }
    return core.patch_namespaced_pod_status(name, namespace, status)


def set_ready(core: CoreV1Api, namespace: str, name: str, ready: bool) -> V1Pod:
    """Flip the Ready/ContainersReady conditions of a Running pod (e.g. a failing probe)."""
    now = _now()
    value = "True" if ready else "False"
    pod = core.read_namespaced_pod(name, namespace)
    conds = []
    for c in (pod.status.conditions if pod.status and pod.status.conditions else []):
        d = {"type": c.type, "status": c.status, "lastProbeTime": None,
             "lastTransitionTime": now if c.type in ("Ready", "ContainersReady") else
             (c.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ") if c.last_transition_time else now)}
        if c.type in ("Ready", "ContainersReady"):
            d["status"] = value
        conds.append(d)
    statuses = []
    for cs in (pod.status.container_statuses if pod.status and pod.status.container_statuses else []):
        statuses.append({"name": cs.name, "image": cs.image, "imageID": cs.image_id,
                         "containerID": cs.container_id, "ready": ready, "started": True,
                         "restartCount": cs.restart_count,
                         "state": {"running": {"startedAt": now}}})
    body: Any = {"status": {"conditions": conds, "containerStatuses": statuses}}
    return core.patch_namespaced_pod_status(name, namespace, body)


class LoopbackIPs:
    """Hands out distinct loopback addresses (127.0.1.1, 127.0.1.2, …) for simulated pods.

    Linux routes all of 127.0.0.0/8 to ``lo``, so a process can bind each of them without setup.
    """

    def __init__(self, base: str = "127.0.1.0") -> None:
        net = ipaddress.ip_address(base)
        if not net.is_loopback:
            raise ValueError(f"{base} is not a loopback address")
        self._next = int(net) + 1
        self._last = int(ipaddress.ip_address("127.255.255.254"))

    def next(self) -> str:
        if self._next > self._last:
            raise RuntimeError("out of loopback addresses")
        ip = str(ipaddress.ip_address(self._next))
        self._next += 1
        return ip


def mark_failed(core: CoreV1Api, namespace: str, name: str, *, reason: str = "Simulated") -> V1Pod:
    """Patch the status so the pod looks dead (phase Failed, not Ready)."""
    now = _now()
    status = {
        "status": {
            "phase": "Failed",
            "reason": reason,
            "conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": now, "lastProbeTime": None},
                {"type": "ContainersReady", "status": "False", "lastTransitionTime": now,
                 "lastProbeTime": None},
            ],
        }
    }
    return core.patch_namespaced_pod_status(name, namespace, status)


def delete_pod(core: CoreV1Api, namespace: str, name: str, *, wait: bool = True,
               timeout: float = 60.0) -> None:
    """Delete with grace period 0 (no kubelet will ever confirm a graceful one)."""
    from kubernetes.client.rest import ApiException

    try:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except ApiException as e:
        if e.status == 404:
            return
        raise
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {namespace}/{name} still exists {timeout:.0f}s after deletion")
        time.sleep(0.1)
