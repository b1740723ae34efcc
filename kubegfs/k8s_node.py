"""Read this pod's node topology labels from the Kubernetes API (in-cluster), so a chunkserver or
master started by the Helm chart knows its zone and region (the downward API only gives the node
name). Plain ``requests`` with the pod's ServiceAccount token; needs ``get`` on ``nodes``.

A process asked to read its topology and unable to do so stops with one clear error (the pod
restarts and its status shows why) rather than running without a zone: placement would silently
stop spreading replicas and snapshot records across zones."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path

import requests

from .errors import KubegfsError
from .topology import Location

SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ZONE, REGION, HOSTNAME = "topology.kubernetes.io/zone", "topology.kubernetes.io/region", "kubernetes.io/hostname"
log = logging.getLogger("kubegfs.k8s_node")


class TopologyUnavailable(KubegfsError):
    code = "topology_unavailable"


def api_base(host: str, port: str) -> str:
    """``https://host:port`` with an IPv6 literal bracketed (``https://[fd00::1]:443``)."""
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            host = f"[{host.strip('[]')}]"
    except ValueError:
        pass  # a DNS name
    return f"https://{host}:{port}"


def in_cluster_api() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        raise TopologyUnavailable("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST); "
                                  "drop --topology-from-node or pass --zone/--region")
    return api_base(host, os.environ.get("KUBERNETES_SERVICE_PORT", "443"))


def node_location(node: str, ip: str = "", sa_dir: Path = SA, api: str | None = None,
                  timeout: float = 60.0) -> Location:
    """Location of ``node`` from its labels. Retries transient failures for ``timeout`` seconds;
    raises :class:`TopologyUnavailable` if the node cannot be read (a refusal is not retried)."""
    base = api or in_cluster_api()
    deadline = time.monotonic() + timeout
    while True:
        try:
            token = (sa_dir / "token").read_text().strip()
            r = requests.get(f"{base}/api/v1/nodes/{node}", headers={"Authorization": f"Bearer {token}"},
                             verify=str(sa_dir / "ca.crt"), timeout=min(10.0, timeout))
            if r.status_code in (401, 403, 404):
                raise TopologyUnavailable(
                    f"cannot read node {node} from {base}: HTTP {r.status_code} (the ServiceAccount "
                    f"needs get on nodes; the chart's node-reader ClusterRole grants it)")
            r.raise_for_status()
            labels = r.json().get("metadata", {}).get("labels", {}) or {}
            break
        except (OSError, requests.RequestException, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise TopologyUnavailable(f"cannot read node {node} from {base} within {timeout:.0f}s: {exc}") from exc
            log.warning("reading node %s failed (%s); retrying", node, exc)
            time.sleep(1.0)
    missing = [k for k in (ZONE, REGION) if not labels.get(k)]
    if missing:
        log.warning("node %s has no %s label: placement treats it as its own failure domain",
                    node, " or ".join(missing))
    return Location(labels.get(HOSTNAME, node), labels.get(ZONE, ""), labels.get(REGION, ""), ip)
