"""Operator configuration from the environment (set by the Helm chart)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    token: str
    default_cluster: str = "kubegfs"
    default_namespace: str = ""  # "" = the custom resource's own namespace
    metrics_listen: str = "0.0.0.0:9090"
    master_port: int = 9400
    chunkserver_port: int = 9500
    request_timeout: float = 30.0
    delete_give_up_after: int = 30  # retries of a Delete-policy cleanup before the finalizer is released
    schedule_tick: float = 10.0  # a SnapshotSchedule is looked at at least this often (and at each run)

    @classmethod
    def from_env(cls) -> Config:
        token = os.environ.get("KUBEGFS_TOKEN", "")
        tf = os.environ.get("KUBEGFS_TOKEN_FILE")
        if tf:
            token = Path(tf).read_text().strip()
        if not token:
            raise SystemExit("kubegfs-operator: set KUBEGFS_TOKEN or KUBEGFS_TOKEN_FILE")
        return cls(
            token=token,
            default_cluster=os.environ.get("KUBEGFS_CLUSTER", "kubegfs"),
            default_namespace=os.environ.get("KUBEGFS_CLUSTER_NAMESPACE", ""),
            metrics_listen=os.environ.get("KUBEGFS_OPERATOR_METRICS", "0.0.0.0:9090"),
            master_port=int(os.environ.get("KUBEGFS_MASTER_PORT", "9400")),
            chunkserver_port=int(os.environ.get("KUBEGFS_CHUNKSERVER_PORT", "9500")),
            schedule_tick=seconds("KUBEGFS_SCHEDULE_TICK_SECONDS", 10.0),
        )


def seconds(var: str, default: float) -> float:
    """A positive number of seconds from the environment; a clear exit otherwise."""
    text = os.environ.get(var, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 86400:
        raise SystemExit(f"kubegfs-operator: {var}={text!r} must be a number of seconds from 0.05 to 86400")
    return value


def catalog_sync_seconds() -> float:
    """How often each Ready Snapshot is checked against the master's catalog. Read when the
    handlers are registered (kopf timers take a fixed interval)."""
    return seconds("KUBEGFS_CATALOG_SYNC_SECONDS", 60.0)
