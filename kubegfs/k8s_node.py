"""Read this pod's node topology labels from the Kubernetes API (in-cluster), so a chunkserver or
master started by the Helm chart knows its zone and region (the downward API only gives the node
name). Plain ``requests`` with the pod's ServiceAccount token; needs ``get`` on ``nodes``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import requests

from .topology import Location

SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
log = logging.getLogger("kubegfs.k8s_node")


def node_location(node: str, ip: str = "", sa_dir: Path = SA, api: str | None = None,
                  timeout: float = 10.0) -> Location:
    """Location of ``node`` from its labels; on any failure, just the node name (logged)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    base = api or (f"https://{host}:{port}" if host else "")
    try:
        if not base:
            raise RuntimeError("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST)")
        token = (sa_dir / "token").read_text().strip()
        r = requests.get(f"{base}/api/v1/nodes/{node}", headers={"Authorization": f"Bearer {token}"},
                         verify=str(sa_dir / "ca.crt"), timeout=timeout)
        r.raise_for_status()
        labels = r.json().get("metadata", {}).get("labels", {}) or {}
        return Location(labels.get("kubernetes.io/hostname", node),
                        labels.get("topology.kubernetes.io/zone", ""),
                        labels.get("topology.kubernetes.io/region", ""), ip)
    except (OSError, RuntimeError, requests.RequestException, ValueError) as exc:
        log.warning("could not read labels of node %s (%s); topology is the node name only", node, exc)
        return Location(node, "", "", ip)
