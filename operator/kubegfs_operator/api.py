"""Typed parsing of Snapshot and Restore specs. The API server's schema and CEL rules reject most
bad input; this re-checks with the file system's own rules and raises ``SpecError``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from kubegfs import paths
from kubegfs.errors import InvalidArgument


class SpecError(ValueError):
    """The spec can never work: the handler turns this into a permanent failure."""


@dataclass(frozen=True)
class ClusterRef:
    name: str
    namespace: str


@dataclass(frozen=True)
class SnapshotSpec:
    path: str
    copies: int
    deletion_policy: str
    cluster: ClusterRef


@dataclass(frozen=True)
class RestoreSpec:
    snapshot_name: str
    target_path: str | None
    timeout_seconds: int
    pre_restore_snapshot: bool = True


_DNS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _path(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{what} must be a string")
    try:
        return paths.normalize(value)
    except InvalidArgument as exc:
        raise SpecError(f"{what}: {exc.message}") from exc


def _cluster(spec: dict[str, Any], own_namespace: str, default_name: str, default_ns: str) -> ClusterRef:
    c = spec.get("cluster") or {}
    if not isinstance(c, dict):
        raise SpecError("cluster must be an object")
    name = c.get("name") or default_name
    ns = c.get("namespace") or default_ns or own_namespace
    for v, what in ((name, "cluster.name"), (ns, "cluster.namespace")):
        if not isinstance(v, str) or len(v) > 63 or not _DNS.fullmatch(v):
            raise SpecError(f"{what} must be a DNS label")
    return ClusterRef(name, ns)


def parse_snapshot(spec: dict[str, Any], namespace: str, default_cluster: str = "kubegfs",
                   default_namespace: str = "") -> SnapshotSpec:
    path = _path(spec.get("path"), "path")
    copies = spec.get("copies", 2)
    if not isinstance(copies, int) or isinstance(copies, bool) or not 1 <= copies <= 16:
        raise SpecError("copies must be an integer from 1 to 16")
    policy = spec.get("deletionPolicy", "Delete")
    if policy not in ("Delete", "Retain"):
        raise SpecError("deletionPolicy must be Delete or Retain")
    return SnapshotSpec(path, copies, policy, _cluster(spec, namespace, default_cluster, default_namespace))


def parse_restore(spec: dict[str, Any]) -> RestoreSpec:
    name = spec.get("snapshotName")
    if not isinstance(name, str) or not name or len(name) > 253:
        raise SpecError("snapshotName must name a Snapshot in this namespace")
    target = spec.get("targetPath")
    tp = _path(target, "targetPath") if target is not None else None
    if tp == "/":
        raise SpecError("targetPath must not be '/'")
    timeout = spec.get("timeoutSeconds", 300)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 86400:
        raise SpecError("timeoutSeconds must be an integer from 1 to 86400")
    pre = spec.get("preRestoreSnapshot", True)
    if not isinstance(pre, bool):
        raise SpecError("preRestoreSnapshot must be true or false")
    return RestoreSpec(name, tp, timeout, pre)


# ----------------------------------------------------------------------------- derived names
# Names the operator derives from the user's (catalog names, Snapshot objects a schedule or a
# restore creates, label values) must fit their own limits for ANY legal user name: a name that
# would be too long keeps a readable prefix and ends in a hash of the whole.

MAX_NAME = 253  # a Kubernetes object name (DNS subdomain), and a kubegfs catalog name
MAX_LABEL_VALUE = 63


def shorten(text: str, limit: int) -> str:
    """``text`` itself when it fits, else a prefix + '-' + 10 hex digits of its sha256. The
    result ends in an alphanumeric, as object names and label values must."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return text[: limit - len(digest) - 1].rstrip("-.") + "-" + digest


def derived_name(base: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``base`` + ``suffix`` within ``limit``, shortening ``base`` (never the suffix)."""
    return shorten(base, limit - len(suffix)) + suffix


def label_value(name: str) -> str:
    return shorten(name, MAX_LABEL_VALUE)


def kubegfs_snapshot_name(namespace: str, name: str, uid: str) -> str:
    """The catalog name: readable, unique per object (a re-created object gets a new one)."""
    return derived_name(f"{namespace}.{name}", f"-{uid.replace('-', '')[:8]}")


def kubegfs_snapshot_id(uid: str) -> str:
    """Derived from the object's uid, so a retried or restarted handler never snapshots twice."""
    return f"k8s-{uid.lower()}"


def kubegfs_restore_id(uid: str) -> str:
    return f"k8s-restore-{uid.lower()}"
